"""The task contract: what a meta-learning problem offers to the engine.

A task has a kind (classification or regression), an input shape, an output size, a
metric with its direction, and three deterministic splits of episodes:

* **meta-train**: sampled afresh (from the trial's generator) for meta-learning;
* **meta-val**: fixed episodes, identical for every trial, that the search ranks on;
* **meta-test**: fixed episodes for the final leaderboard, never seen by the search.

An episode is a support set (to adapt on) and a query set (to score on). A plain target
dataset fits the same contract: one episode whose support is its training split and
whose query is its validation (meta-val) or test (meta-test) split.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar, NoReturn

import torch
from torch import Tensor

from autometa.errors import ConfigError, unknown
from autometa.metrics import ACCURACY, MSE, Metric, TaskKind, loss_for
from autometa.numeric_inputs import InputBatch, read_numbers
from autometa.space import SearchSpace

__all__ = ["EpisodeSet", "Episodes", "IndexedEpisodes", "InputBatch", "MixedEpisodes", "Task",
           "TaskSpec"]


@dataclass(frozen=True)
class TaskSpec:
    """The part of a task a source model needs to build a network."""

    kind: TaskKind
    input_shape: tuple[int, ...]  # one example, e.g. (1,) or (1, 28, 28)
    output_size: int  # classes (classification) or target dimensions (regression)


@dataclass(frozen=True)
class Episodes:
    """A batch of episodes with equal sizes, tasks along the first dimension.

    Shapes: ``support_x`` (tasks, n_support, *input_shape); ``support_y`` (tasks, n_support)
    integer labels for classification or (tasks, n_support, out) for regression; the
    query tensors likewise with n_query.
    """

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor

    def __len__(self) -> int:
        return self.support_x.shape[0]

    def __getitem__(self, index: int | slice | Tensor) -> Episodes:
        return Episodes(*(getattr(self, f.name)[index] for f in fields(self)))

    def to(self, device: torch.device | str) -> Episodes:
        return Episodes(*(getattr(self, f.name).to(device) for f in fields(self)))


class IndexedEpisodes:
    """Fixed episodes held as indices into a dataset; a slice is gathered when asked.

    The evaluation episodes of a large dataset (600 episodes of 80 images at 84 px are
    4 GB as float32) are never held as copies: the engine scores them a chunk at a time,
    ``episodes[start:stop]``, which gathers just that chunk's examples (the
    learn2learn/Torchmeta way: an episode is an index set over a dataset).

    Args:
        support, query: example indices, (tasks, n_support) and (tasks, n_query), int64.
        support_y, query_y: their labels (or regression targets), as in :class:`Episodes`.
        gather: indices of any shape (...) → examples (..., *input_shape), float32 on the
            task's device (e.g. :meth:`autometa.image_store.StoredImages.gather`).
    """

    def __init__(self, support: Tensor, support_y: Tensor, query: Tensor, query_y: Tensor,
                 gather: Callable[[Tensor], Tensor]) -> None:
        self.support, self.support_y = support, support_y
        self.query, self.query_y = query, query_y
        self.gather = gather

    def __len__(self) -> int:
        return self.support.shape[0]

    def __getitem__(self, index: slice | Tensor) -> Episodes:
        """The episodes at ``index`` (a slice or index tensor), gathered now."""
        return Episodes(self.gather(self.support[index]), self.support_y[index],
                        self.gather(self.query[index]), self.query_y[index])

    @property
    def support_x(self) -> Tensor:
        """Every episode's support examples, gathered (memory: all of them; slice first)."""
        return self.gather(self.support)

    @property
    def query_x(self) -> Tensor:
        """Every episode's query examples, gathered (memory: all of them; slice first)."""
        return self.gather(self.query)

    def to(self, device: torch.device | str) -> Episodes:
        return self[:].to(device)


class MixedEpisodes:
    """Fixed episodes of differing sizes, held as indices, in order.

    :class:`Episodes` is a batch of equal-sized episodes. Evaluation episodes that differ
    in size (Meta-Album's any-way any-shot protocol, where each episode draws its own N
    and K: Ullah et al., NeurIPS 2022 Datasets and Benchmarks) are held as *groups* of
    equal-sized :class:`IndexedEpisodes`: episode ``i`` is episode ``position[i]`` of group
    ``group[i]``. Nothing is gathered (no image copied) until the set is indexed.

    Indexing by an int, a slice or an int64 tensor of episode numbers keeps the order
    asked for. A selection whose episodes all have one size is gathered now and gives
    :class:`Episodes` (``episodes[:1]`` works as for any set); a selection of several sizes
    gives another :class:`MixedEpisodes` (indices only). :func:`autometa.trial.evaluate`
    scores a mixed set one size at a time (:meth:`by_size`), a chunk at a time, and returns
    the scores in episode order.

    Args:
        groups: sets of equal-sized episodes each (:class:`IndexedEpisodes`: support
            (tasks_g, n_support_g), query (tasks_g, n_query_g)).
        group: (n,) int64, each episode's group.
        position: (n,) int64, its index in that group.

    Raises:
        ValueError: ``group`` and ``position`` differ in shape, or point outside the groups.
    """

    def __init__(self, groups: Sequence[IndexedEpisodes], group: Tensor, position: Tensor
                 ) -> None:
        self.groups = list(groups)
        self.group = torch.as_tensor(group, dtype=torch.long).cpu()
        self.position = torch.as_tensor(position, dtype=torch.long).cpu()
        if self.group.dim() != 1 or self.group.shape != self.position.shape:
            raise ValueError(f"MixedEpisodes: group {tuple(self.group.shape)} and position "
                             f"{tuple(self.position.shape)} must be two (n,) tensors")
        counts = torch.tensor([len(g) for g in self.groups], dtype=torch.long)
        if len(self.group) and (int(self.group.min()) < 0
                                or int(self.group.max()) >= len(self.groups)
                                or bool((self.position < 0).any())
                                or bool((self.position >= counts[self.group]).any())):
            raise ValueError(f"MixedEpisodes: an episode points outside the {len(self.groups)} "
                             f"group(s) of {counts.tolist()} episodes")
        sizes = [(g.support.shape[1], g.query.shape[1]) for g in self.groups]
        distinct = list(dict.fromkeys(sizes))
        # (groups,): the size of each group, numbered in order of first appearance
        self._size = torch.tensor([distinct.index(s) for s in sizes], dtype=torch.long)
        self._sizes = distinct

    @classmethod
    def concat(cls, parts: Sequence[IndexedEpisodes]) -> MixedEpisodes:
        """The episodes of ``parts``, one part after another, in order."""
        group = torch.cat([torch.full((len(p),), i, dtype=torch.long)
                           for i, p in enumerate(parts)])
        position = torch.cat([torch.arange(len(p)) for p in parts])
        return cls(parts, group, position)

    def __len__(self) -> int:
        return len(self.group)

    def sizes(self) -> list[tuple[int, int]]:
        """Each episode's (n_support, n_query), in order."""
        return [self._sizes[int(s)] for s in self._size[self.group]]

    def by_size(self) -> list[Tensor]:
        """The numbers of the episodes of each size (ascending; the sizes in order of
        first appearance): int64 tensors that together hold every episode once."""
        size = self._size[self.group]  # (n,)
        every = (torch.nonzero(size == s).flatten() for s in range(len(self._sizes)))
        return [ids for ids in every if len(ids)]

    def __getitem__(self, index: int | slice | Tensor) -> Episodes | MixedEpisodes:
        """The episodes at ``index``: :class:`Episodes` if they share one size (an int
        drops the task dimension, as :class:`Episodes` does), else a :class:`MixedEpisodes`.

        Raises:
            IndexError: an episode number out of range.
        """
        if isinstance(index, int):
            if not -len(self) <= index < len(self):
                raise IndexError(f"episode {index} of {len(self)}")
            return self[index : (index + 1) or None][0]
        ids = torch.arange(len(self))[index.cpu() if isinstance(index, Tensor) else index]
        group, position = self.group[ids], self.position[ids]
        used = group.unique()  # sorted
        if len(torch.unique(self._size[used])) > 1:  # several sizes: indices only
            mine = [group == g for g in used.tolist()]
            parts = [_select(self.groups[g], position[m]) for g, m in zip(used.tolist(), mine,
                                                                         strict=True)]
            rank = torch.empty_like(position)
            for m in mine:
                rank[m] = torch.arange(int(m.sum()))
            return MixedEpisodes(parts, torch.searchsorted(used, group), rank)
        if len(used) <= 1:  # one group (or nothing): gathered by it
            g = self.groups[int(used[0]) if len(used) else 0]
            return g[position.to(g.support.device)]
        # One size over several groups: each group's part gathered, back in the order asked.
        order = torch.cat([torch.nonzero(group == g).flatten() for g in used.tolist()])
        parts = [self.groups[g][position[group == g].to(self.groups[g].support.device)]
                 for g in used.tolist()]
        back = torch.argsort(order).to(parts[0].support_x.device)
        return Episodes(*(torch.cat([getattr(p, f.name) for p in parts])[back]
                          for f in fields(Episodes)))

    def _whole(self, name: str) -> NoReturn:
        raise TypeError(f"MixedEpisodes has no {name}: its episodes differ in size; index "
                        "episodes of one size (episodes[ids], ids from by_size()) or score "
                        "them with autometa.trial.evaluate")

    @property
    def support_x(self) -> Tensor:
        """Refused (TypeError): the episodes differ in size."""
        self._whole("support_x")

    @property
    def support_y(self) -> Tensor:
        """Refused (TypeError), as :attr:`support_x`."""
        self._whole("support_y")

    @property
    def query_x(self) -> Tensor:
        """Refused (TypeError), as :attr:`support_x`."""
        self._whole("query_x")

    @property
    def query_y(self) -> Tensor:
        """Refused (TypeError), as :attr:`support_x`."""
        self._whole("query_y")


def _select(episodes: IndexedEpisodes, position: Tensor) -> IndexedEpisodes:
    """The episodes of ``episodes`` at ``position``, still as indices."""
    at = position.to(episodes.support.device)
    return IndexedEpisodes(episodes.support[at], episodes.support_y[at], episodes.query[at],
                           episodes.query_y[at], episodes.gather)


#: What ``meta_val()`` and ``meta_test()`` return: episodes held as tensors, as indices,
#: or as indices of differing sizes. Each gives :class:`Episodes` when indexed or sliced
#: (``episodes[start:stop]``), a :class:`MixedEpisodes` only where the episodes selected
#: differ in size.
EpisodeSet = Episodes | IndexedEpisodes | MixedEpisodes


class Task(ABC):
    """Base class of task definitions (see the module docstring for the life cycle).

    Subclasses take their parameters as keyword arguments with defaults, plus ``seed``
    (which fixes the data, the class splits and the meta-val/meta-test episodes) and
    ``device`` (where the tensors live). The engine builds a task once per search and
    shares it between trials, so build data in ``__init__``, not per call.
    """

    #: Declared ranges of the keyword parameters (``task_params``), checked before building.
    params: ClassVar[SearchSpace] = {}
    #: Per-trial settings of how meta-train episodes are drawn (e.g. augmentation), with
    #: their declared ranges. Not constructor arguments: the engine gives each trial its
    #: values through :meth:`configure_trial`; a user fixes or searches each one in
    #: ``task_params`` as an algorithm's hyperparameter. Each name's default is the class
    #: attribute of that name.
    trial_params: ClassVar[SearchSpace] = {}

    kind: TaskKind
    input_shape: tuple[int, ...]
    output_size: int
    #: Classification episodes of 2 to ``output_size`` ways (labels 0..N-1 in an N-way
    #: one), as Meta-Album's any-way episodes; :class:`~autometa.predictor.Predictor`
    #: then adapts to a support set of that many classes. False: always ``output_size``.
    any_ways: bool = False

    def __init__(self, *, seed: int = 0, device: torch.device | str = "cpu") -> None:
        self.seed = seed
        self.device = torch.device(device)
        # What built this task; the engine sets the registered name and parameters.
        self.identity: dict[str, Any] = {"task": type(self).__name__, "params": {}, "seed": seed}

    def configure_trial(self, **values: Any) -> None:
        """Set one trial's values of :attr:`trial_params` (every name, defaults included).

        Called by the engine before a trial meta-trains, and when a stored trial is
        rebuilt, on the task that the trials of a process share. These settings change
        meta-train episodes only (:meth:`sample`, :meth:`sample_labelled`): meta-val and
        meta-test scoring are never affected. The default sets each value as an attribute;
        override it (calling it) to prepare what depends on them.

        Raises:
            ConfigError: a name not in :attr:`trial_params`.
        """
        for name, value in values.items():
            if name not in self.trial_params:
                raise ConfigError(unknown(f"trial parameter of task {type(self).__name__}",
                                          name, self.trial_params))
            setattr(self, name, value)

    @property
    def spec(self) -> TaskSpec:
        return TaskSpec(self.kind, tuple(self.input_shape), self.output_size)

    @property
    def metric(self) -> Metric:
        """MSE for regression, accuracy for classification; override for others."""
        return MSE if self.kind == "regression" else ACCURACY

    def loss(self, pred: Tensor, target: Tensor) -> Tensor:
        """Training loss averaged over all leading dimensions."""
        return loss_for(self.kind, pred, target)

    @abstractmethod
    def sample(self, n_tasks: int, generator: torch.Generator) -> Episodes:
        """Sample ``n_tasks`` meta-train episodes using ``generator`` (on ``self.device``)."""

    @abstractmethod
    def meta_val(self) -> EpisodeSet:
        """The fixed validation episodes (the same object for every call and every trial);
        the engine slices them a chunk at a time."""

    @abstractmethod
    def meta_test(self) -> EpisodeSet:
        """The fixed test episodes (the same object for every call and every trial)."""

    def train_episodes(self) -> EpisodeSet | None:
        """The train split as one episode that adapts on it and is scored on it, for a
        task with a fixed train split (a target dataset); None (the default) otherwise.

        Its score is the adapted model's train score (the accuracy on the examples it was
        adapted on), shown beside the test score so that over- and under-fitting can be
        seen; the engine scores it with meta-test, for the same trials.
        """
        return None

    def episode_domains(self, split: str) -> list[str] | None:
        """The domain of each fixed episode of ``split`` ("meta-val" or "meta-test"), in
        the episodes' order, for a task whose episodes come from several domains (datasets);
        None (the default) for a single-domain task.

        The leaderboard scores each domain of meta-test apart (mean ± 95% CI over its
        episodes) from the per-episode scores, so the list must have one name per episode.
        """
        return None

    #: Meta-train classes with global labels, for supervised pre-training (0: none).
    train_classes: int = 0

    def sample_labelled(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """``n`` meta-train examples with global labels in ``[0, train_classes)``.

        Used by supervised pre-training (the fine-tuning baselines, pretrained sources).
        Classification tasks with a class split should implement it.
        """
        raise NotImplementedError(f"task {type(self).__name__} has no labelled meta-train pool")

    def read_inputs(self, path: Path, *, labelled: bool) -> InputBatch:
        """New examples at ``path``, encoded exactly as this task encodes its own data.

        Used by ``autometa predict``: its ``--input`` (``labelled=False``) and its
        ``--support`` (``labelled=True``: a support set to adapt on, with labels). The
        default reads a CSV of numbers, one column per input value, given to the model as
        they are (:mod:`autometa.numeric_inputs`: a ``label`` column names the classes;
        ``target`` or ``target_<i>`` columns hold regression targets). Override it when
        the task encodes its data (scales numbers, one-hot encodes text, decodes images):
        ``autometa predict`` then trusts a target task's inputs without a support set.

        Args:
            path: an existing file or folder (the caller checked that it exists).
            labelled: read a label for every example too (a support set).

        Returns:
            The examples, ``labels`` set only if ``labelled``.

        Raises:
            DataError: the inputs cannot be read or do not match the task; one line
                naming the file (or column, row) and the fix.
        """
        return read_numbers(self, path, labelled=labelled)

    def describe(self) -> dict[str, Any]:
        """Facts shown in reports."""
        return {
            "kind": self.kind,
            "input_shape": list(self.input_shape),
            "output_size": self.output_size,
            "metric": self.metric.name,
            "direction": self.metric.direction,
        }
