"""Meta-Album as a task: N-way K-shot episodes over several image datasets (domains), each
episode from one domain, meta-test scored per domain.

Source: Ullah et al., "Meta-Album: Multi-domain Meta-Dataset for Few-Shot Image
Classification", NeurIPS 2022 Datasets and Benchmarks (github.com/ihsaan-ullah/meta-album).
``path`` is a folder of Meta-Album datasets (:mod:`autometa_plugins.meta_album.reader`
reads the format); ``domains`` chooses some of them (comma-separated folder names; default:
all), always taken in sorted order.

* **Class split, per domain.** Each domain's classes are split at random into meta-train,
  meta-val and meta-test (``val_fraction`` and ``test_fraction`` of its classes, at least
  one each, rounded half up; the rest trains). Meta-Album's format ships no split: its
  within-domain experiments draw one (70 / 15 / 15 % of the classes), so the defaults are
  0.15 and 0.15. The split is seeded by the task's seed and the domain's name only, so a
  domain splits the same whichever other domains are chosen.
* **Episodes** (:mod:`autometa_plugins.meta_album.episodes`). Every episode first draws
  a domain uniformly, then ``ways`` of that domain's classes (of the split) and ``shots`` +
  ``queries`` images of each, as Meta-Album's cross-domain loader does; meta-train batches
  are drawn vectorised from the trial's generator. The fixed meta-val and meta-test
  episodes are shared evenly by the domains (as Meta-Album's test loader shares them),
  held as indices into the image store; :meth:`~MetaAlbum.episode_domains` gives each
  one's domain, and the leaderboard scores meta-test per domain from it. Meta-train
  episodes can be augmented per trial (:class:`~autometa.datasets.AugmentedImages`).
* **Ways and shots.** Fixed (``ways``, ``shots``: every episode N-way K-shot, 5-way
  5-shot by default with 16 queries per class, Meta-Album's ``query_size``), or drawn per
  episode: ``ways="any"`` draws N from 2..``max_ways`` (20), ``shots="any"`` K from
  1..``max_shots`` (20), Meta-Album's any-way any-shot protocol; each domain's split caps
  them (its classes; its smallest class less ``queries``). Fixed meta-val/meta-test
  episodes each draw their own N and K (a :class:`~autometa.task.MixedEpisodes`).
  **Deviation:** autometa's episode contract (:class:`autometa.task.Episodes`) holds a
  batch of equal-sized episodes, so the episodes of one meta-train batch share one (N, K),
  drawn per ``sample`` call, capped by the smallest cap among the batch's domains.
  ``output_size`` is the largest N possible; an N-way episode's labels are 0..N-1, and the
  loss and accuracy leave the other outputs out (:func:`autometa.metrics.mask_absent`).

Images are decoded once per machine into one uint8 store for all the chosen domains
(:mod:`autometa.image_store`), at ``size`` (128, Meta-Album's) and ``channels`` (3), by the
``resize`` policy. Shapes: an episode batch's ``support_x`` is (tasks, ways*shots, C, size,
size), ``query_x`` (tasks, ways*queries, C, size, size), labels 0..ways-1.

Raises (when built): ConfigError for a bad setting (``ways``/``shots`` neither a number nor
"any", ``max_ways`` < 2, ...), DataError for data that cannot give the episodes asked for
(a split with fewer classes than ``ways``, or than 2 with "any"; a class with fewer images
than ``shots`` + ``queries``, or 1 + ``queries`` with "any"), each one line naming the fix.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor

from autometa import Categorical, ConfigError, DataError, Float, Int
from autometa.datasets import FEW_SHOT_PARAMS, AugmentedImages, split_classes
from autometa.episodes import ClassPool
from autometa.image_store import FileImages, StoredImages, open_store
from autometa.images import RESIZE_POLICIES
from autometa.space import SearchSpace
from autometa.task import InputBatch
from autometa_plugins.meta_album.episodes import ANY, SPLITS, DomainEpisodes
from autometa_plugins.meta_album.inputs import read_images
from autometa_plugins.meta_album.reader import NAME, Domain, read


class MetaAlbum(AugmentedImages, DomainEpisodes):
    """Few-shot classification over several Meta-Album datasets (see the module docstring).

    Meta-train episodes can be augmented per trial (``crop_scale``, ``flip``, ``jitter``:
    :class:`~autometa.datasets.AugmentedImages`), off unless a search sets them.
    """

    # ``ways`` and ``shots`` take a number or "any" (no declared range holds both): their
    # annotations parse them (``--task-param ways=any``), __init__ checks them.
    params: ClassVar[SearchSpace] = {
        **{k: p for k, p in FEW_SHOT_PARAMS.items() if k not in ("ways", "shots")},
        "max_ways": Int(2, 1000),
        "max_shots": Int(1, 1000),
        "val_fraction": Float(0.05, 0.5),
        "test_fraction": Float(0.05, 0.5),
        "size": Int(4, 512),
        "channels": Categorical(("auto", 1, 3)),
        "resize": Categorical(RESIZE_POLICIES),
    }

    def __init__(
        self,
        *,
        path: str | os.PathLike[str] | None = None,  # the folder of datasets (required)
        domains: str | None = None,  # comma-separated dataset folders; None: all of them
        size: int = 128,  # images are resized to size x size (Meta-Album's are 128)
        channels: int | str = 3,  # 3 (RGB), 1 (grayscale), or "auto": 1 if all are gray
        resize: str = "stretch",  # non-square images: "stretch", "center-crop" or "pad"
        ways: int | str = 5,  # classes per episode, all from one domain; "any": 2..max_ways
        shots: int | str = 5,  # support images per class; "any": 1..max_shots
        queries: int = 16,  # query images per class (Meta-Album's query_size)
        max_ways: int = 20,  # the largest N of ways="any" (Meta-Album's 20)
        max_shots: int = 20,  # the largest K of shots="any" (Meta-Album's 20)
        val_fraction: float = 0.15,  # of each domain's classes, for meta-val
        test_fraction: float = 0.15,  # likewise, for meta-test
        val_episodes: int = 100,  # fixed meta-val episodes, shared evenly by the domains
        test_episodes: int = 600,  # fixed meta-test episodes (Meta-Album evaluates 600)
        seed: int = 0,
        device: torch.device | str = "cpu",
        cache_dir: str | os.PathLike[str] | None = None,  # this machine's (--cache-dir)
    ) -> None:
        super().__init__(seed=seed, device=device)
        for key, value in {"channels": channels, "resize": resize}.items():
            choices = self.params[key].choices  # type: ignore[union-attr]
            if value not in choices or isinstance(value, bool):
                raise ConfigError(f"{NAME}: {key}={value!r} is not one of {list(choices)}")
        for key, value, least, top in (("ways", ways, 2, "max_ways"),
                                       ("shots", shots, 1, "max_shots")):
            if value != ANY and (isinstance(value, bool) or not isinstance(value, int)
                                 or value < least):
                raise ConfigError(f"{NAME}: {key}={value!r} is neither a whole number from "
                                  f"{least} nor 'any'; give e.g. {key}=5, or {key}=any to "
                                  f"draw it per episode (up to {top})")
        for key, value, least in (("max_ways", max_ways, 2), ("max_shots", max_shots, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ConfigError(f"{NAME}: {key}={value!r} is below {least}; give a whole "
                                  f"number of at least {least} (Meta-Album's is 20)")
        if path is None:
            raise ConfigError(f"{NAME}: give the folder of Meta-Album datasets, e.g. "
                              "--task-param path=data/meta-album (or task_params={'path': "
                              "...}); it holds one folder per dataset")
        if val_fraction + test_fraction >= 0.9:
            raise ConfigError(f"{NAME}: val_fraction + test_fraction = "
                              f"{val_fraction + test_fraction:g} leaves too little to train "
                              "on; keep the sum below 0.9")
        root = Path(os.fspath(path))
        self.root, self.resize = root, resize
        self.domains = read(root, domains)
        n_domains = len(self.domains)
        for key, n in (("val_episodes", val_episodes), ("test_episodes", test_episodes)):
            if n < n_domains:
                raise ConfigError(f"{NAME}: {key}={n} is fewer than the {n_domains} domains; "
                                  f"every domain needs an episode: set {key} to at least "
                                  f"{n_domains} (or choose fewer domains)")
        least_ways = 2 if ways == ANY else int(ways)
        least_shots = 1 if shots == ANY else int(shots)
        for domain in self.domains:  # cheap checks first: nothing is decoded yet
            _check_class_sizes(domain, least_shots + queries, any_shots=shots == ANY)
        # Global class ids: domain by domain, each domain's classes in sorted order.
        starts = [0]
        for domain in self.domains:
            starts.append(starts[-1] + len(domain.classes))
        self.class_split = [
            [[starts[d] + c for c in split] for split in
             _class_split(domain, least_ways, val_fraction, test_fraction, seed,
                          any_ways=ways == ANY)]
            for d, domain in enumerate(self.domains)]  # [domain][split] -> class ids
        self.class_names = [f"{domain.name}/{c}" for domain in self.domains
                            for c in domain.classes]
        counts = [len(f) for domain in self.domains for f in domain.files]
        # (n,): each image's global class, in store order (domain, class, CSV row)
        self.labels = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
        self.images = self._decode(size, channels, resize, cache_dir)
        self.input_shape = tuple(self.images.shape[1:])
        pools = {split: [ClassPool(self.images, self.labels, self.class_split[d][s],
                                   name=f"{NAME} {domain.name} {split}")
                         for d, domain in enumerate(self.domains)]
                 for s, split in enumerate(SPLITS)}
        self.set_domains([d.name for d in self.domains], pools, self.images.gather,
                         ways=ways, shots=shots, queries=queries, val_episodes=val_episodes,
                         test_episodes=test_episodes, max_ways=max_ways, max_shots=max_shots)
        train = [c for per_domain in self.class_split for c in per_domain[0]]
        self.labelled = ClassPool(self.images, self.labels, train, name=f"{NAME} meta-train")
        self.train_classes = len(train)
        self._digest: str | None = None

    # -- building -------------------------------------------------------------------------
    def _decode(self, size: int, channels: int | str, resize: str,
                cache_dir: str | os.PathLike[str] | None) -> StoredImages:
        """Every chosen domain's images, in store order, from one store (built now if this
        machine has none for these files and settings)."""
        files = [f for domain in self.domains for per_class in domain.files for f in per_class]
        # The slot names the domains too: a store of other domains of the same folder is
        # another dataset, not an older version of this one (it is kept).
        slot = json.dumps({"path": str(self.root.resolve()),
                           "domains": [d.name for d in self.domains]})
        store = open_store(FileImages(files, slot=slot), name=NAME, size=size,
                           channels=channels, resize=resize, cache_dir=cache_dir)
        return StoredImages(store, self.device)  # (n, C, size, size), gathered

    # -- beyond the episodes ---------------------------------------------------------------
    def sample_labelled(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """``n`` meta-train images of any domain with labels in ``[0, train_classes)``."""
        return self.labelled.sample_labelled(n, generator)

    def labelled_digest(self) -> str:
        """sha256 (hex) of what :meth:`sample_labelled` draws from (the meta-train images
        and labels) and of the class split (see :meth:`FewShotTask.labelled_digest`)."""
        if self._digest is None:
            facts = {"shape": "meta-album", "meta-train": self.labelled.digest(),
                     "split": self.class_split,
                     "domains": [d.name for d in self.domains]}
            self._digest = hashlib.sha256(json.dumps(facts, sort_keys=True).encode()
                                          ).hexdigest()
        return self._digest

    def read_inputs(self, path: Path, *, labelled: bool) -> InputBatch:
        """An image file or a folder of them; a support set is one Meta-Album dataset
        (:mod:`autometa_plugins.meta_album.inputs`). Decoded as this task's images."""
        return read_images(self, path, labelled=labelled)

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "path": str(self.root.resolve()),
            "domains": [d.name for d in self.domains],
            "episodes": {"ways": self.ways, "shots": self.shots, "queries": self.queries,
                         **({"max_ways": self.output_size} if self.any_ways else {}),
                         **({"max_shots": max(c for caps in self.caps.values()
                                              for _, c in caps)} if self.any_shots else {})},
            "classes": {d.name: len(d.classes) for d in self.domains},
            "images": {d.name: d.images for d in self.domains},
            "class_split": {d.name: dict(zip(SPLITS, map(len, split), strict=True))
                            for d, split in zip(self.domains, self.class_split, strict=True)},
        }


def _check_class_sizes(domain: Domain, need: int, *, any_shots: bool = False) -> None:
    """Raise DataError naming the smallest class of ``domain`` with fewer than ``need``
    images (``any_shots``: need is 1 shot + queries)."""
    short = [(len(f), c) for c, f in zip(domain.classes, domain.files, strict=True)
             if len(f) < need]
    if short:
        n, name = min(short)
        others = f" (and {len(short) - 1} other class(es))" if len(short) > 1 else ""
        needs, fix = (("1 shot (shots=any) + queries", "'queries'") if any_shots
                      else ("shots + queries", "'shots' or 'queries'"))
        raise DataError(f"{NAME}: class {name!r} of domain {domain.name!r} has {n} image(s), "
                        f"fewer than {needs} = {need}{others}; lower {fix}, or leave the "
                        "domain out with 'domains'")


def _class_split(domain: Domain, ways: int, val_fraction: float, test_fraction: float,
                 seed: int, *, any_ways: bool = False) -> list[list[int]]:
    """The domain's class indices (0..) of meta-train, meta-val and meta-test, sorted: a
    split seeded by ``seed`` and the domain's name.

    Raises:
        DataError: a split with fewer than ``ways`` classes (``any_ways``: ``ways`` is 2, the
            fewest an any-way episode has), naming the domain, the split and the counts.
    """
    n = len(domain.classes)
    n_val, n_test = (max(1, math.floor(f * n + 0.5)) for f in (val_fraction, test_fraction))
    sizes = [n - n_val - n_test, n_val, n_test]
    short = [(split, got) for split, got in zip(SPLITS, sizes, strict=True) if got < ways]
    if short:
        split, got = short[0]
        per = ", ".join(f"{s} {max(g, 0)}" for s, g in zip(SPLITS, sizes, strict=True))
        needs, fix = (("2 (ways=any draws 2 to max_ways)", "") if any_ways
                      else (f"ways = {ways}", "lower 'ways', "))
        raise DataError(
            f"{NAME}: domain {domain.name!r} has {max(got, 0)} {split} class(es), fewer than "
            f"{needs}: its {n} classes split {per} (val_fraction={val_fraction:g}, "
            f"test_fraction={test_fraction:g}); {fix}change the fractions, leave the domain "
            "out with 'domains', or add classes")
    digest = hashlib.sha256(f"{seed}/{domain.name}".encode()).digest()
    parts = split_classes(list(range(n)), sizes, int.from_bytes(digest[:7], "little"),
                          name=f"{NAME} {domain.name}")
    return [sorted(p) for p in parts]
