"""Vectorised N-way K-shot episode sampling over a pool of labelled examples.

A :class:`ClassPool` groups example *indices* by class; an episode batch is a handful of
indexing operations, with no Python loop over tasks, classes or examples, that draws
indices (:meth:`ClassPool.sample_indices`) and then gathers just those examples. The
examples are a tensor on the run's device (small datasets), or any :class:`Examples`:
e.g. a decoded-image store shared by every process (:mod:`autometa.image_store`), whose
batches are gathered on the host and converted to float on the device.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from autometa.errors import DataError
from autometa.task import Episodes, IndexedEpisodes

__all__ = ["ClassPool", "Examples", "TensorExamples"]


@runtime_checkable
class Examples(Protocol):
    """A dataset's examples, gathered by index (a tensor's indexing, or a shared store)."""

    @property
    def shape(self) -> tuple[int, ...]:
        """(n, *input_shape)"""

    @property
    def device(self) -> torch.device:
        """Where :meth:`gather` puts its result (and where a pool draws its indices)."""

    def gather(self, index: Tensor) -> Tensor:
        """Examples ``index`` (any shape, int64): (*index.shape, *input_shape) float32."""


class TensorExamples:
    """Examples held as one tensor (n, *input_shape) on its device."""

    def __init__(self, x: Tensor) -> None:
        self.x = x

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape)

    @property
    def device(self) -> torch.device:
        return self.x.device

    def gather(self, index: Tensor) -> Tensor:
        return self.x[index.to(self.device)]


class ClassPool:
    """Examples of some classes, relabelled ``0..n_classes-1`` in the order given.

    Args:
        x: all examples: a tensor (n, *input_shape), kept on its device, or
            :class:`Examples` (e.g. :class:`~autometa.image_store.StoredImages`); the
            pool's index tensors and random draws live on ``x.device``.
        y: their integer class ids, (n,).
        classes: the class ids of this pool (e.g. the meta-train split).
        name: used in error messages (e.g. "digits meta-train").
    """

    def __init__(self, x: Tensor | Examples, y: Tensor, classes: Sequence[int], *,
                 name: str) -> None:
        examples: Examples = TensorExamples(x) if isinstance(x, Tensor) else x
        y = y.to(examples.device)
        self.name = name
        self.classes = [int(c) for c in classes]
        # Each class's example indices in ascending order, by one stable sort of the labels
        # (not a pass over all labels per class: tiered-ImageNet has 608 x 779,165).
        order = torch.argsort(y, stable=True)
        wanted = torch.tensor(self.classes, dtype=y.dtype, device=y.device)
        sorted_y = y[order]
        starts = torch.searchsorted(sorted_y, wanted).tolist()
        ends = torch.searchsorted(sorted_y, wanted, right=True).tolist()
        members = [order[a:b] for a, b in zip(starts, ends, strict=True)]
        empty = [c for c, m in zip(self.classes, members, strict=True) if len(m) == 0]
        if empty:
            raise DataError(f"{name}: class(es) {empty} have no examples")
        # (classes,)
        self.counts = torch.tensor([len(m) for m in members], device=examples.device)
        width = int(self.counts.max())
        # (classes, width): example indices per class, padded by repeating the first one.
        self.index = torch.stack([
            torch.cat([m, m[:1].expand(width - len(m))]) for m in members
        ]).to(examples.device)
        self.x = x  # as given (a tensor, or Examples)
        self.examples = examples

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    def check(self, ways: int, per_class: int) -> None:
        """Raise DataError unless ``ways``-way episodes with ``per_class`` examples fit."""
        if ways > self.n_classes:
            raise DataError(
                f"{self.name}: {ways}-way episodes need {ways} classes, only "
                f"{self.n_classes} are available; lower 'ways'"
            )
        smallest = int(self.counts.min())
        if per_class > smallest:
            cls = self.classes[int(self.counts.argmin())]
            raise DataError(
                f"{self.name}: class {cls} has {smallest} examples, fewer than shots + queries "
                f"= {per_class}; lower 'shots' or 'queries'"
            )

    def sample_indices(
        self, n_tasks: int, ways: int, shots: int, queries: int, generator: torch.Generator,
        *, shuffle_classes: bool = True,
    ) -> tuple[Tensor, Tensor]:
        """The examples of ``n_tasks`` episodes, as indices into ``x``: (tasks, ways,
        shots + queries), the first ``shots`` of each class the support; and their labels,
        0..ways-1 in each episode in class order, of the same shape.

        Args:
            shuffle_classes: draw ``ways`` random classes per episode (few-shot episodes);
                if False, every episode has the pool's first ``ways`` classes with their
                pool labels (a target dataset's own classes).
        """
        self.check(ways, shots + queries)
        device = self.examples.device
        k = shots + queries
        if shuffle_classes:  # random classes per task: the first `ways` of a permutation
            classes = torch.rand(n_tasks, self.n_classes, generator=generator,
                                 device=device).argsort(1)[:, :ways]  # (tasks, ways)
        else:
            classes = torch.arange(ways, device=device).expand(n_tasks, ways)
        # Random distinct examples per class: padding sorts last, so never drawn.
        width = self.index.shape[1]
        keys = torch.rand(n_tasks, ways, width, generator=generator, device=device)
        padding = torch.arange(width, device=device) >= self.counts[classes][..., None]
        keys = keys.masked_fill(padding, 2.0)
        picks = keys.argsort(-1)[..., :k]  # (tasks, ways, k)
        examples = self.index[classes[..., None], picks]  # (tasks, ways, k)
        labels = torch.arange(ways, device=device).view(1, ways, 1).expand(n_tasks, ways, k)
        return examples, labels

    def sample(
        self, n_tasks: int, ways: int, shots: int, queries: int, generator: torch.Generator,
        *, shuffle_classes: bool = True,
    ) -> Episodes:
        """``n_tasks`` episodes (:meth:`sample_indices`, gathered now).

        Shapes: support (tasks, ways*shots, *input_shape), query (tasks, ways*queries, ...).
        """
        return self.sample_fixed(n_tasks, ways, shots, queries, generator,
                                 shuffle_classes=shuffle_classes)[:]

    def sample_fixed(
        self, n_tasks: int, ways: int, shots: int, queries: int, generator: torch.Generator,
        *, shuffle_classes: bool = True,
    ) -> IndexedEpisodes:
        """``n_tasks`` episodes held as indices (fixed evaluation episodes), gathered a
        slice at a time when indexed (:class:`~autometa.task.IndexedEpisodes`)."""
        examples, labels = self.sample_indices(n_tasks, ways, shots, queries, generator,
                                               shuffle_classes=shuffle_classes)
        support, query = examples[:, :, :shots], examples[:, :, shots:]
        return IndexedEpisodes(
            support=support.reshape(n_tasks, ways * shots),
            support_y=labels[:, :, :shots].reshape(n_tasks, ways * shots),
            query=query.reshape(n_tasks, ways * queries),
            query_y=labels[:, :, shots:].reshape(n_tasks, ways * queries),
            gather=self.examples.gather,
        )

    def digest(self) -> str:
        """sha256 (hex) of the pool's content: its examples and their pool labels.

        Canonical whatever the device or dtype: class by class in pool order, each class's
        label and count, then its examples in the order given, as contiguous float32 on
        the CPU. Equal pools give equal digests; any changed value, example or class
        order gives another. One pass over the data (about 2 s per GB on one CPU core).
        """
        hasher = hashlib.sha256(repr(("ClassPool", tuple(self.examples.shape[1:]))).encode())
        index = self.index.cpu()
        for label, count in enumerate(self.counts.tolist()):
            members = index[label, :count].to(self.examples.device)
            # (count, *input_shape)
            rows = self.examples.gather(members).to("cpu", torch.float32).contiguous()
            hasher.update(struct.pack("<qq", label, count))
            hasher.update(rows.numpy().data)  # the buffer itself: no extra copy
        return hasher.hexdigest()

    def sample_labelled(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """``n`` random examples with their pool labels: (n, *input_shape), (n,)."""
        device = self.examples.device
        label = torch.randint(self.n_classes, (n,), generator=generator, device=device)
        slot = (torch.rand(n, generator=generator, device=device)
                * self.counts[label]).long()
        return self.examples.gather(self.index[label, slot]), label
