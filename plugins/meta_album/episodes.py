"""N-way K-shot episodes over several domains: every episode from one domain.

:class:`DomainEpisodes` is the episode half of the meta-album task: given one
:class:`~autometa.episodes.ClassPool` per domain and split (all over one image store), it
draws meta-train episodes, holds the fixed meta-val and meta-test episodes as indices, and
records each fixed episode's domain (:meth:`~autometa.task.Task.episode_domains`).

* **Meta-train**: each episode draws its domain uniformly (as Meta-Album's cross-domain
  loader does), then ``ways`` of that domain's classes and ``shots`` + ``queries`` images
  of each. Vectorised: every domain's pool draws the whole batch and each episode keeps its
  own domain's draw (a loop over the domains, none over episodes, classes or images; the
  unused draws are index arithmetic, small beside gathering the images).
* **Meta-val / meta-test**: the domains share the episodes evenly (counts differ by at most
  one, as Meta-Album's test loader gives each test dataset the same number) in a seeded,
  shuffled order, so a prefix of them (the Wilcoxon pruner's) is a mix of domains.

A subclass sits above it in the method order of an augmentation mixin
(:class:`~autometa.datasets.AugmentedImages`), which wraps :meth:`DomainEpisodes.sample`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from autometa.episodes import ClassPool
from autometa.task import Episodes, EpisodeSet, IndexedEpisodes, Task

SPLITS = ("meta-train", "meta-val", "meta-test")


class DomainEpisodes(Task):
    """Few-shot classification episodes, each from one of several domains.

    Subclasses read their data and call :meth:`set_domains`.
    """

    kind = "classification"

    def set_domains(self, names: Sequence[str], pools: dict[str, list[ClassPool]],
                    gather: Callable[[Tensor], Tensor], *, ways: int, shots: int,
                    queries: int, val_episodes: int, test_episodes: int) -> None:
        """Take the domains' pools and draw the fixed evaluation episodes.

        Args:
            names: the domains, in the order of each split's pools.
            pools: ``{split: [the domain's pool of that split, per domain]}`` for every
                split of :data:`SPLITS`; their examples are indices into ``gather``'s.
            gather: indices (...) → images (..., C, H, W) on the task's device.
            val_episodes, test_episodes: at least one per domain.
        """
        self.domain_names = list(names)
        self.pools, self._gather = pools, gather
        self.ways, self.shots, self.queries = ways, shots, queries
        self.output_size = ways
        for split in SPLITS:
            for pool in pools[split]:
                pool.check(ways, shots + queries)  # fail now, not mid-search
        self._fixed = {split: self._fixed_episodes(split, n, stream) for split, n, stream in
                       (("meta-val", val_episodes, 1), ("meta-test", test_episodes, 2))}

    def _generator(self, stream: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(self.seed * 1_000_003 + stream)

    def _fixed_episodes(self, split: str, n: int, stream: int
                        ) -> tuple[IndexedEpisodes, list[str]]:
        """``n`` fixed episodes of ``split``, the domains shared evenly in a seeded order,
        and each episode's domain."""
        g = self._generator(stream)
        shuffle = torch.randperm(n, generator=g, device=self.device)
        domain = (torch.arange(n, device=self.device) % len(self.domain_names))[shuffle]
        index = torch.empty(n, self.ways, self.shots + self.queries, dtype=torch.long,
                            device=self.device)  # (n, ways, shots + queries)
        for d, pool in enumerate(self.pools[split]):  # a loop over the domains only
            mine = torch.nonzero(domain == d).flatten()
            index[mine] = pool.sample_indices(len(mine), self.ways, self.shots,
                                              self.queries, g)[0]
        return self._indexed(index), [self.domain_names[d] for d in domain.tolist()]

    def _indexed(self, index: Tensor) -> IndexedEpisodes:
        """Episodes from image indices (tasks, ways, shots + queries), the first ``shots``
        of each class the support; labels 0..ways-1 in class order."""
        n, ways, k = index.shape
        shots, queries = self.shots, k - self.shots
        labels = torch.arange(ways, device=index.device).view(1, ways, 1).expand(n, ways, k)
        return IndexedEpisodes(
            support=index[:, :, :shots].reshape(n, ways * shots),
            support_y=labels[:, :, :shots].reshape(n, ways * shots),
            query=index[:, :, shots:].reshape(n, ways * queries),
            query_y=labels[:, :, shots:].reshape(n, ways * queries),
            gather=self._gather)

    def sample(self, n_tasks: int, generator: torch.Generator) -> Episodes:
        """``n_tasks`` meta-train episodes, each from a domain drawn uniformly.

        Shapes: support (tasks, ways*shots, C, H, W), query (tasks, ways*queries, ...).
        """
        domain = torch.randint(len(self.domain_names), (n_tasks,), generator=generator,
                               device=self.device)  # (tasks,)
        drawn = torch.stack([pool.sample_indices(n_tasks, self.ways, self.shots, self.queries,
                                                 generator)[0]
                             for pool in self.pools["meta-train"]])  # (domains, tasks, ways, k)
        index = drawn[domain, torch.arange(n_tasks, device=self.device)]  # (tasks, ways, k)
        return self._indexed(index)[:]

    def meta_val(self) -> EpisodeSet:
        return self._fixed["meta-val"][0]

    def meta_test(self) -> EpisodeSet:
        return self._fixed["meta-test"][0]

    def episode_domains(self, split: str) -> list[str] | None:
        """The domain of each fixed episode of ``split`` ("meta-val" or "meta-test"), in
        order; None with a single domain (nothing to score apart)."""
        if split not in self._fixed:
            raise ValueError(f"split {split!r}: expected 'meta-val' or 'meta-test'")
        return list(self._fixed[split][1]) if len(self.domain_names) > 1 else None
