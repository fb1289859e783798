"""Datasets as tasks: the two shapes of labelled data a task plugin usually has.

* :class:`FewShotTask`: N-way K-shot classification over a **class split**. Meta-train,
  meta-val and meta-test episodes come from three :class:`~autometa.episodes.ClassPool`
  objects (usually disjoint classes); meta-val and meta-test episodes are drawn once from
  the seed, so every trial is scored on the same episodes.
* :class:`TargetTask`: one **target dataset** (a CSV file, iris, "is it a 3?") split into
  train/val/test examples. Meta-val is one episode whose support set is the whole train
  split and whose query set is the val split; meta-test likewise with the test split.
  Meta-train episodes are drawn from the train split only, so an algorithm can meta-learn
  on the target's own training data; pre-training sees the train split's global labels.

Both hold their data as tensors on the task's device and sample episodes by indexing;
the helpers below validate data once, with one clear :class:`~autometa.DataError`. A task
that may take either shape (a user's file, read as few-shot or as a target dataset)
subclasses :class:`InnerTask` and hands its episodes to the one it builds.

Both (and :class:`InnerTask`) offer ``labelled_digest()``: a sha256 of the data supervised
pre-training sees (the labelled meta-train pool, examples and global labels) and of the
split (which classes, or how many examples, are meta-train, meta-val and meta-test).
Caches of anything trained on a task (the ``pretrained`` source model's) are keyed on it
rather than on the task's parameters, so rows appended to a user's file are never served
features pre-trained before. It is computed once per task, on first use.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from autometa.augment import Augmentation
from autometa.episodes import ClassPool, Examples, TensorExamples
from autometa.errors import ConfigError, DataError
from autometa.space import Categorical, Float, Int, SearchSpace
from autometa.task import Episodes, EpisodeSet, IndexedEpisodes, Task

__all__ = [
    "AUGMENT_PARAMS",
    "AugmentedImages",
    "FEW_SHOT_PARAMS",
    "FewShotTask",
    "InnerTask",
    "TARGET_PARAMS",
    "TargetTask",
    "check_finite",
    "split_classes",
    "split_examples",
]

#: Episode-size parameters shared by few-shot tasks, with their declared ranges.
FEW_SHOT_PARAMS: SearchSpace = {
    "ways": Int(2, 1000),
    "shots": Int(1, 1000),
    "queries": Int(1, 1000),
    "val_episodes": Int(1, 100_000),
    "test_episodes": Int(2, 100_000),
}

#: Parameters shared by target tasks.
TARGET_PARAMS: SearchSpace = {
    "shots": Int(1, 10_000),
    "queries": Int(1, 10_000),
    "val_fraction": Float(0.05, 0.5),
    "test_fraction": Float(0.05, 0.5),
}


#: Meta-train augmentation of image tasks, per trial (:class:`AugmentedImages`): the
#: settings of :class:`autometa.augment.Augmentation`, with its ranges.
AUGMENT_PARAMS: SearchSpace = {
    "crop_scale": Float(0.08, 1.0),
    "flip": Categorical((False, True)),
    "jitter": Float(0.0, 1.0),
}


class AugmentedImages:
    """Mixin for image tasks (list it first among the bases): meta-train episodes
    augmented as the few-shot literature does (random resized crop, horizontal flip,
    colour jitter; :class:`autometa.augment.Augmentation`), in batch on the task's device.

    The settings are per-trial task settings (:attr:`Task.trial_params`): off unless a
    search fixes them (``--task-param flip=true``) or searches them
    (``--task-param 'crop_scale={low=0.08,high=1}'``). Only meta-train episodes are
    augmented, support and query images alike, each image independently, with random
    numbers from the trial's generator; meta-val, meta-test and labelled pre-training
    batches never are, and with every setting off nothing is drawn (the episodes of a seed
    are those of an unaugmented task).
    """

    trial_params: ClassVar[SearchSpace] = AUGMENT_PARAMS
    crop_scale: float = 1.0  # RandomResizedCrop's smallest area fraction (1: no crop)
    flip: bool = False  # horizontal flip with probability 0.5
    jitter: float = 0.0  # brightness, contrast and saturation strength (0: none)
    augmentation: Augmentation | None = None

    def configure_trial(self, **values: Any) -> None:
        super().configure_trial(**values)  # type: ignore[misc]
        augmentation = Augmentation(self.crop_scale, self.flip, self.jitter)
        self.augmentation = augmentation if augmentation.active else None

    def sample(self, n_tasks: int, generator: torch.Generator) -> Episodes:
        episodes: Episodes = super().sample(n_tasks, generator)  # type: ignore[misc]
        if self.augmentation is None:
            return episodes

        def augment(x: Tensor) -> Tensor:  # (tasks, n, C, H, W)
            return self.augmentation(x.flatten(0, 1), generator).view_as(x)  # type: ignore

        return Episodes(augment(episodes.support_x), episodes.support_y,
                        augment(episodes.query_x), episodes.query_y)


def check_finite(x: Tensor, what: str) -> None:
    """Raise DataError if ``x`` (n, ...) holds NaN or infinite values, naming the first row."""
    if len(x) == 0:
        return
    bad = ~torch.isfinite(x.reshape(len(x), -1)).all(1)  # (n,)
    if bool(bad.any()):
        rows = torch.nonzero(bad).flatten()
        raise DataError(
            f"{what}: {len(rows)} example(s) hold NaN or infinite values (first: row "
            f"{int(rows[0])}); remove or impute them before the search"
        )


def split_classes(
    classes: Sequence[Any], sizes: Sequence[int], seed: int, *, name: str
) -> list[list[Any]]:
    """Split ``classes`` at random (from ``seed``) into disjoint groups of ``sizes``.

    Raises:
        DataError: there are fewer classes than the sizes add up to.
    """
    if sum(sizes) > len(classes):
        raise DataError(
            f"{name}: the class split needs {' + '.join(map(str, sizes))} = {sum(sizes)} "
            f"classes, the data has {len(classes)}; lower the split sizes or add classes"
        )
    order = torch.randperm(len(classes), generator=torch.Generator().manual_seed(seed))
    groups, start = [], 0
    for size in sizes:
        groups.append([classes[int(i)] for i in order[start:start + size]])
        start += size
    return groups


class FewShotTask(Task):
    """N-way K-shot classification episodes over a class split.

    Subclasses call ``super().__init__(...)`` with the episode sizes, load their data, and
    call :meth:`set_pools` with the meta-train, meta-val and meta-test pools.
    """

    kind = "classification"
    params = FEW_SHOT_PARAMS

    def __init__(
        self,
        *,
        ways: int,
        shots: int,
        queries: int,
        val_episodes: int,
        test_episodes: int,
        seed: int = 0,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__(seed=seed, device=device)
        self.ways, self.shots, self.queries = ways, shots, queries
        self.val_episodes, self.test_episodes = val_episodes, test_episodes
        self.output_size = ways

    def set_pools(self, train: ClassPool, val: ClassPool, test: ClassPool) -> None:
        """Check that the episodes fit every pool and draw the fixed evaluation episodes."""
        for pool in (train, val, test):
            pool.check(self.ways, self.shots + self.queries)  # fail now, not mid-search
        self.train = train
        self.train_classes = train.n_classes
        self._split = {"meta-train": train.classes, "meta-val": val.classes,
                       "meta-test": test.classes}
        self._digest: str | None = None
        # Held as indices (gathered a chunk at a time when scored), never as copies.
        self._val = val.sample_fixed(self.val_episodes, self.ways, self.shots,
                                     self.queries, self._generator(1))
        self._test = test.sample_fixed(self.test_episodes, self.ways, self.shots,
                                       self.queries, self._generator(2))

    def _generator(self, stream: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(self.seed * 1_000_003 + stream)

    def sample(self, n_tasks: int, generator: torch.Generator) -> Episodes:
        return self.train.sample(n_tasks, self.ways, self.shots, self.queries, generator)

    def meta_train_classes(self) -> tuple[int, int]:
        """(meta-train classes, ways): C(classes, ways) distinct class sets can be drawn
        (checked by :func:`autometa.caveats.few_class_sets` when a search is prepared)."""
        return self.train.n_classes, self.ways

    def sample_labelled(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        return self.train.sample_labelled(n, generator)

    def labelled_digest(self) -> str:
        """sha256 (hex) of the meta-train pool (what :meth:`sample_labelled` draws from:
        examples and global labels) and of the class split (the class ids of each split).

        Computed once (one pass over the meta-train examples), then remembered.
        """
        if self._digest is None:
            self._digest = _digest({"shape": "few-shot", "meta-train": self.train.digest(),
                                    "split": self._split})
        return self._digest

    def meta_val(self) -> EpisodeSet:
        return self._val

    def meta_test(self) -> EpisodeSet:
        return self._test


def _digest(facts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()


def split_examples(
    y: Tensor, *, val_fraction: float, test_fraction: float, seed: int, stratify: bool,
    name: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """Indices of a seeded train/val/test split of ``len(y)`` examples.

    With ``stratify`` (classification), every class is split in the same proportions and
    keeps at least one example in each part.

    Raises:
        DataError: too few examples (or, stratified, a class too small) for three parts.
    """
    if val_fraction + test_fraction >= 0.9:
        raise ConfigError(f"{name}: val_fraction + test_fraction = "
                          f"{val_fraction + test_fraction:g} leaves too little to train on; "
                          "keep the sum below 0.9")
    g = torch.Generator().manual_seed(seed)
    y = y.cpu()
    groups = [torch.nonzero(y == c).flatten() for c in torch.unique(y)] if stratify \
        else [torch.arange(len(y))]
    parts: list[list[Tensor]] = [[], [], []]
    for members in groups:
        n = len(members)
        if n < 3:
            what = f"class {y[members[0]].item()!r} has" if stratify else "the data has"
            raise DataError(f"{name}: {what} {n} example(s); a train/val/test split needs "
                            "at least 3 per class")
        n_val = min(max(1, round(val_fraction * n)), n - 2)
        n_test = min(max(1, round(test_fraction * n)), n - 1 - n_val)
        shuffled = members[torch.randperm(n, generator=g)]
        parts[0].append(shuffled[n_val + n_test:])
        parts[1].append(shuffled[:n_val])
        parts[2].append(shuffled[n_val:n_val + n_test])
    train, val, test = (torch.cat(p).sort().values for p in parts)
    return train, val, test


class TargetTask(Task):
    """A target dataset split into train/val/test examples (see the module docstring).

    Subclasses call ``super().__init__(...)``, load their data, and call :meth:`set_data`.
    Classification labels are ``0..classes-1`` (long); regression targets are (n, out).
    Meta-train episodes: for classification, ``shots`` support and ``queries`` query
    examples of every class, labels fixed (class c is always label c); for regression,
    ``shots`` + ``queries`` random examples.
    """

    params = TARGET_PARAMS

    def __init__(
        self,
        *,
        shots: int,
        queries: int,
        val_fraction: float,
        test_fraction: float,
        seed: int = 0,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__(seed=seed, device=device)
        self.shots, self.queries = shots, queries
        self.val_fraction, self.test_fraction = val_fraction, test_fraction

    def split(self, y: Tensor, name: str) -> tuple[Tensor, Tensor, Tensor]:
        """This task's seeded train/val/test split of ``y`` (fit preprocessing on ``[0]``)."""
        return split_examples(y, val_fraction=self.val_fraction,
                              test_fraction=self.test_fraction, seed=self.seed,
                              stratify=self.kind == "classification", name=name)

    def set_data(
        self, x: Tensor | Examples, y: Tensor, split: tuple[Tensor, Tensor, Tensor], *,
        name: str, class_names: Sequence[str] = (),
    ) -> None:
        """Hold the examples and ``y``, split by ``split`` indices (train, val, test).

        Args:
            x: every example: a tensor (n, *input_shape), moved to the device, or
                :class:`~autometa.episodes.Examples` (classification only), e.g. a shared
                image store; the val and test episodes hold indices into it, not copies.
        """
        examples: Examples
        if isinstance(x, Tensor):
            check_finite(x, name)
            examples = TensorExamples(x.to(self.device, torch.float32))
        elif self.kind != "classification":
            raise TypeError("regression data must be a tensor")
        else:
            examples = x
        y = y.to(self.device)
        self.input_shape = tuple(examples.shape[1:])
        self.class_names = list(class_names)
        train, val, test = (i.to(self.device) for i in split)
        if self.kind == "classification":
            y = y.long()
            classes = int(y.max()) + 1 if len(y) else 0
            seen = torch.unique(y[train]).numel()
            if classes < 2 or seen < classes:
                raise DataError(f"{name}: the labels hold {seen} class(es) in the train split; "
                                "classification needs at least 2, each in the train split")
            self.output_size = classes
            # The pool sees the train split only (-1 elsewhere), by global index; ``train``
            # is sorted, so each class's examples keep their order within the split.
            in_train = torch.full_like(y, -1)
            in_train[train] = y[train]
            self.train = ClassPool(examples, in_train, range(classes), name=f"{name} train")
            self.train.check(classes, self.shots + self.queries)
            self.train_classes = classes
        else:
            check_finite(y, f"{name} targets")
            y = y.float().reshape(len(y), -1)  # (n, out)
            self.output_size = y.shape[1]
            if self.shots + self.queries > len(train):
                raise DataError(f"{name}: meta-train episodes of shots + queries = "
                                f"{self.shots + self.queries} examples need that many in the "
                                f"train split, which has {len(train)}; lower 'shots' or "
                                "'queries'")
            self._train_x, self._train_y = examples.gather(train), y[train]
        self.sizes = {"train": len(train), "val": len(val), "test": len(test)}
        self._digest: str | None = None

        def one(query: Tensor) -> IndexedEpisodes:  # the train split adapts, ``query`` scores
            return IndexedEpisodes(train[None], y[train][None], query[None], y[query][None],
                                   examples.gather)

        self._val, self._test, self._train_set = one(val), one(test), one(train)

    def sample(self, n_tasks: int, generator: torch.Generator) -> Episodes:
        if self.kind == "classification":
            return self.train.sample(n_tasks, self.output_size, self.shots, self.queries,
                                     generator, shuffle_classes=False)
        n = len(self._train_x)
        picks = torch.rand(n_tasks, n, generator=generator, device=self.device).argsort(1)
        support, query = picks[:, :self.shots], picks[:, self.shots:self.shots + self.queries]
        return Episodes(self._train_x[support], self._train_y[support],
                        self._train_x[query], self._train_y[query])

    def sample_labelled(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        if self.kind != "classification":
            return super().sample_labelled(n, generator)
        return self.train.sample_labelled(n, generator)

    def labelled_digest(self) -> str:
        """sha256 (hex) of the train split (examples and labels, or regression targets)
        and of the split's sizes: what pre-training on this task sees.

        Computed once (one pass over the train split), then remembered.
        """
        if self._digest is None:
            if self.kind == "classification":
                train = self.train.digest()
            else:  # (n, *input_shape) and (n, out), canonical float32 on the CPU
                hasher = hashlib.sha256()
                for tensor in (self._train_x, self._train_y):
                    flat = tensor.to("cpu", torch.float32).contiguous()
                    hasher.update(repr(tuple(flat.shape)).encode())
                    hasher.update(flat.numpy().data)
                train = hasher.hexdigest()
            self._digest = _digest({"shape": "target", "kind": self.kind, "train": train,
                                    "sizes": self.sizes, "outputs": self.output_size})
        return self._digest

    def meta_val(self) -> EpisodeSet:
        return self._val

    def meta_test(self) -> EpisodeSet:
        return self._test

    def train_episodes(self) -> EpisodeSet:
        """The train split, adapted on and scored (the train score)."""
        return self._train_set

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "examples": self.sizes}


class InnerTask(Task):
    """A task whose episodes come from an inner task it builds (a FewShotTask or a
    TargetTask), so that one registered class with one ``params`` serves both shapes.

    Subclasses read and check their data, build the inner task and call :meth:`use`.
    """

    def use(self, inner: Task) -> None:
        """Take ``inner``'s kind, shapes and meta-train classes and forward episodes to it."""
        self._inner = inner
        self.kind = inner.kind
        self.input_shape = tuple(inner.input_shape)
        self.output_size = inner.output_size
        self.train_classes = inner.train_classes

    def sample(self, n_tasks: int, generator: torch.Generator) -> Episodes:
        return self._inner.sample(n_tasks, generator)

    def meta_train_classes(self) -> tuple[int, int] | None:
        """The inner few-shot task's (meta-train classes, ways); None for a target dataset."""
        inner = self._inner
        return inner.meta_train_classes() if isinstance(inner, FewShotTask | InnerTask) \
            else None

    def sample_labelled(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        return self._inner.sample_labelled(n, generator)

    def labelled_digest(self) -> str:
        """The inner task's digest (see :meth:`FewShotTask.labelled_digest`)."""
        digest: str = self._inner.labelled_digest()  # type: ignore[attr-defined]
        return digest

    def meta_val(self) -> EpisodeSet:
        return self._inner.meta_val()

    def meta_test(self) -> EpisodeSet:
        return self._inner.meta_test()

    def train_episodes(self) -> EpisodeSet | None:
        return self._inner.train_episodes()

    def describe(self) -> dict[str, Any]:
        return self._inner.describe()
