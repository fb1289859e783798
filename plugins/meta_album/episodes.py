"""N-way K-shot episodes over several domains: every episode from one domain; N and K
fixed, or drawn per episode (Meta-Album's any-way any-shot protocol).

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
* **Any-way any-shot** (``ways="any"`` and/or ``shots="any"``; Ullah et al., Meta-Album,
  NeurIPS 2022 Datasets and Benchmarks: each episode draws a domain, then 2-20 ways and
  1-20 shots). N is drawn uniformly from 2..``max_ways``, capped by the classes of the
  domain's split; K from 1..``max_shots``, capped by the split's smallest class less
  ``queries``. Each fixed episode draws its own domain, N and K: the set is a
  :class:`~autometa.task.MixedEpisodes` (indices, in order). A meta-train batch is one
  :class:`~autometa.task.Episodes` of equal-sized episodes (the contract), so one
  ``sample`` call draws one (N, K) for the whole batch, after its episodes' domains,
  capped by the smallest cap among the domains drawn (a deviation from the paper, whose
  meta-train episodes are drawn one at a time). ``queries`` stays fixed per class. An
  N-way episode's labels are 0..N-1 of ``output_size`` (the largest N possible): the
  loss and the accuracy take each episode's own classes only
  (:func:`autometa.metrics.mask_absent`).

A subclass sits above it in the method order of an augmentation mixin
(:class:`~autometa.datasets.AugmentedImages`), which wraps :meth:`DomainEpisodes.sample`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from autometa.episodes import ClassPool
from autometa.metrics import EPISODE_ACCURACY, Metric, episode_loss
from autometa.task import Episodes, EpisodeSet, IndexedEpisodes, MixedEpisodes, Task

SPLITS = ("meta-train", "meta-val", "meta-test")
#: The value of ``ways`` or ``shots`` that draws it per episode.
ANY = "any"


class DomainEpisodes(Task):
    """Few-shot classification episodes, each from one of several domains.

    Subclasses read their data and call :meth:`set_domains`.
    """

    kind = "classification"

    def set_domains(self, names: Sequence[str], pools: dict[str, list[ClassPool]],
                    gather: Callable[[Tensor], Tensor], *, ways: int | str, shots: int | str,
                    queries: int, val_episodes: int, test_episodes: int, max_ways: int = 20,
                    max_shots: int = 20) -> None:
        """Take the domains' pools and draw the fixed evaluation episodes.

        Args:
            names: the domains, in the order of each split's pools.
            pools: ``{split: [the domain's pool of that split, per domain]}`` for every
                split of :data:`SPLITS`; their examples are indices into ``gather``'s.
            gather: indices (...) → images (..., C, H, W) on the task's device.
            ways, shots: a number, or :data:`ANY` (drawn per episode up to ``max_ways``,
                ``max_shots``, capped by each pool).
            val_episodes, test_episodes: at least one per domain.

        Raises:
            DataError: a pool too small for the smallest episode (``ways`` classes, or 2
                with "any"; ``shots`` + ``queries`` images per class, or 1 + ``queries``).
        """
        self.domain_names = list(names)
        self.pools, self._gather = pools, gather
        self.ways, self.shots, self.queries = ways, shots, queries
        self.any_ways, self.any_shots = ways == ANY, shots == ANY
        least_ways = 2 if self.any_ways else int(ways)
        least_shots = 1 if self.any_shots else int(shots)
        for split in SPLITS:
            for pool in pools[split]:
                pool.check(least_ways, least_shots + queries)  # fail now, not mid-search
        # {split: [(the largest N, the largest K) of each domain's episodes]}
        self.caps = {split: [(min(max_ways, p.n_classes) if self.any_ways else least_ways,
                              min(max_shots, int(p.counts.min()) - queries)
                              if self.any_shots else least_shots) for p in pools[split]]
                     for split in SPLITS}
        self.output_size = max(w for caps in self.caps.values() for w, _ in caps)
        self._fixed = {split: self._fixed_episodes(split, n, stream) for split, n, stream in
                       (("meta-val", val_episodes, 1), ("meta-test", test_episodes, 2))}

    @property
    def metric(self) -> Metric:
        """Accuracy over each episode's own classes (the same as plain accuracy for fixed
        ways: every episode has all ``output_size`` classes)."""
        return EPISODE_ACCURACY

    def loss(self, pred: Tensor, target: Tensor) -> Tensor:
        """Cross-entropy over each episode's own classes: the logits of classes absent
        from ``target`` (not in the episode) get no probability and no gradient
        (:func:`autometa.metrics.episode_loss`). Shapes (n, out), (n,) or (tasks, n, out),
        (tasks, n); runs under ``torch.func`` (grad, vmap)."""
        return episode_loss(pred, target)

    def _generator(self, stream: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(self.seed * 1_000_003 + stream)

    def _fixed_episodes(self, split: str, n: int, stream: int
                        ) -> tuple[IndexedEpisodes | MixedEpisodes, list[str]]:
        """``n`` fixed episodes of ``split``, the domains shared evenly in a seeded order,
        and each episode's domain. With "any" ways or shots, each episode draws its own N
        and K (uniform up to its domain's caps): a :class:`MixedEpisodes`."""
        g = self._generator(stream)
        shuffle = torch.randperm(n, generator=g, device=self.device)
        domain = (torch.arange(n, device=self.device) % len(self.domain_names))[shuffle]
        names = [self.domain_names[d] for d in domain.tolist()]
        if not (self.any_ways or self.any_shots):
            index = torch.empty(n, int(self.ways), int(self.shots) + self.queries,
                                dtype=torch.long, device=self.device)  # (n, ways, k)
            for d, pool in enumerate(self.pools[split]):  # a loop over the domains only
                mine = torch.nonzero(domain == d).flatten()
                index[mine] = pool.sample_indices(len(mine), int(self.ways), int(self.shots),
                                                  self.queries, g)[0]
            return self._indexed(index, int(self.shots)), names
        caps = torch.tensor(self.caps[split], device=self.device)[domain]  # (n, 2)
        u = torch.rand(2, n, generator=g, device=self.device)
        ways = torch.minimum(2 + (u[0] * (caps[:, 0] - 1)).long(), caps[:, 0])  # 2..cap
        shots = torch.minimum(1 + (u[1] * caps[:, 1]).long(), caps[:, 1])  # 1..cap
        drawn = torch.stack([domain, ways, shots], 1)  # (n, 3)
        groups: list[IndexedEpisodes] = []  # one per distinct (domain, N, K)
        group = torch.empty(n, dtype=torch.long)  # (n,): each episode's group
        position = torch.empty(n, dtype=torch.long)  # (n,): its index in the group
        for d, w, k in drawn.unique(dim=0).tolist():  # a loop over the distinct draws
            mine = torch.nonzero((drawn == torch.tensor([d, w, k], device=self.device))
                                 .all(1)).flatten()
            index = self.pools[split][d].sample_indices(len(mine), w, k, self.queries, g)[0]
            group[mine.cpu()] = len(groups)
            position[mine.cpu()] = torch.arange(len(mine))
            groups.append(self._indexed(index, k))
        return MixedEpisodes(groups, group, position), names

    def _indexed(self, index: Tensor, shots: int) -> IndexedEpisodes:
        """Episodes from image indices (tasks, ways, shots + queries), the first ``shots``
        of each class the support; labels 0..ways-1 in class order."""
        n, ways, k = index.shape
        queries = k - shots
        labels = torch.arange(ways, device=index.device).view(1, ways, 1).expand(n, ways, k)
        return IndexedEpisodes(
            support=index[:, :, :shots].reshape(n, ways * shots),
            support_y=labels[:, :, :shots].reshape(n, ways * shots),
            query=index[:, :, shots:].reshape(n, ways * queries),
            query_y=labels[:, :, shots:].reshape(n, ways * queries),
            gather=self._gather)

    def sample(self, n_tasks: int, generator: torch.Generator) -> Episodes:
        """``n_tasks`` meta-train episodes, each from a domain drawn uniformly.

        With "any" ways or shots, one N and one K for the batch (the contract's episodes
        are equal-sized), drawn after the domains, up to the smallest cap among them.

        Shapes: support (tasks, ways*shots, C, H, W), query (tasks, ways*queries, ...).
        """
        domain = torch.randint(len(self.domain_names), (n_tasks,), generator=generator,
                               device=self.device)  # (tasks,)
        if self.any_ways or self.any_shots:
            return self._sample_any(domain, generator)
        drawn = torch.stack([pool.sample_indices(n_tasks, int(self.ways), int(self.shots),
                                                 self.queries, generator)[0]
                             for pool in self.pools["meta-train"]])  # (domains, tasks, ways, k)
        index = drawn[domain, torch.arange(n_tasks, device=self.device)]  # (tasks, ways, k)
        return self._indexed(index, int(self.shots))[:]

    def _sample_any(self, domain: Tensor, generator: torch.Generator) -> Episodes:
        """One batch of episodes of one drawn (N, K), each from its ``domain``."""
        present = domain.unique().tolist()
        caps = [self.caps["meta-train"][d] for d in present]
        top_ways, top_shots = min(c[0] for c in caps), min(c[1] for c in caps)
        ways = (int(torch.randint(2, top_ways + 1, (1,), generator=generator,
                                  device=self.device)) if self.any_ways else int(self.ways))
        shots = (int(torch.randint(1, top_shots + 1, (1,), generator=generator,
                                   device=self.device)) if self.any_shots else int(self.shots))
        index = torch.empty(len(domain), ways, shots + self.queries, dtype=torch.long,
                            device=self.device)  # (tasks, ways, k)
        for d in present:  # a loop over the domains drawn only
            mine = torch.nonzero(domain == d).flatten()
            index[mine] = self.pools["meta-train"][d].sample_indices(
                len(mine), ways, shots, self.queries, generator)[0]
        return self._indexed(index, shots)[:]

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
