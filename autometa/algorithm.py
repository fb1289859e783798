"""The meta-algorithm contract.

Life cycle, driven by the engine for every trial:

1. ``algo = Algorithm(model, task, **hyperparameters)``: the model comes from the chosen
   source model, already on the run's device; build optimizers and any learned state here.
2. ``algo.meta_step(task.sample(algo.tasks_per_step, generator))`` repeated for the
   trial's budget of meta-steps (skipped when ``meta_trains`` is False). Every
   ``eval_every`` steps the engine scores ``adapt_and_predict`` on the meta-val episodes
   and reports it to Optuna, which may prune the trial.
3. ``algo.adapt_and_predict(episodes)``: adapt to each episode's support set and return
   predictions for its query set. Used for meta-val, then meta-test on the leaderboard.
4. ``algo.state_dict()`` is saved with the trial; ``load_state_dict`` restores it to
   evaluate the trial on meta-test later.
5. ``algo.adapted_module(support_x, support_y)`` (optional): the model adapted to one
   support set as a plain module, for ``autometa export``'s ``model.pt2``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar

from torch import Tensor, nn

from autometa.metrics import TaskKind
from autometa.source_model import Backbone
from autometa.space import SearchSpace
from autometa.task import Episodes, Task

__all__ = ["MetaAlgorithm"]


class MetaAlgorithm(ABC):
    """Base class of meta-algorithms.

    Hyperparameters are the keyword arguments of ``__init__`` after ``model`` and
    ``task`` (with defaults); the ones worth searching are declared in
    :meth:`search_space` with their ranges.
    """

    #: Task kinds this algorithm supports.
    kinds: ClassVar[frozenset[TaskKind]] = frozenset({"classification", "regression"})
    #: False for algorithms that only adapt (a linear probe): the engine skips meta-training.
    #: The engine reads it from the instance, so ``__init__`` may set it from a
    #: hyperparameter (pmf's ``meta_train=False``: no meta-training for that trial).
    meta_trains: bool = True
    #: False: a search runs this algorithm only when it is named (``--algorithms``), for an
    #: algorithm whose cost makes it a poor default (pmf fine-tunes the whole backbone on
    #: every evaluation episode). It is listed by ``autometa plugins`` either way.
    searched_by_default: ClassVar[bool] = True

    def __init__(self, model: Backbone, task: Task) -> None:
        self.model = model
        self.task = task
        self.tasks_per_step = 1  # meta-batch size: episodes sampled per meta_step

    @classmethod
    def search_space(cls) -> SearchSpace:
        """Hyperparameters to search and their ranges (default: none).

        An override may take a keyword ``task=None``: the engine then passes the search's
        task, so that hyperparameters that only matter for one kind of task are not
        searched for the other. Called without it (listings, the conformance kit), return
        the whole space.
        """
        return {}

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """Hyperparameters a portfolio start (``initial = "portfolio"``) runs this
        algorithm with first: its paper's settings, by default the constructor's keyword
        defaults. A value outside the search's (narrowed) space is left to the sampler."""
        from autometa.params import keyword_defaults

        return keyword_defaults(cls)

    @classmethod
    def incompatibility(cls, task: Task) -> str | None:
        """Why this algorithm cannot serve ``task``, or None if it can.

        The engine asks before anything is stored: an algorithm named in the search is
        refused with this reason, one that was not is left out. The default checks
        :attr:`kinds`; override to add needs (e.g. a labelled meta-train pool).
        """
        if task.kind not in cls.kinds:
            return f"supports {' and '.join(sorted(cls.kinds))} tasks, the task is {task.kind}"
        return None

    @classmethod
    def model_incompatibility(cls, model: Backbone, settings: Mapping[str, Any]) -> str | None:
        """Why this algorithm cannot adapt ``model`` with ``settings`` (a sentence naming
        the setting and the fix), or None if it can.

        The engine asks before anything is stored, for every source model of the search,
        with the network that source builds for the task (its searched settings at their
        defaults) and this algorithm's settings: a fixed value, or, for a searched one,
        its :class:`~autometa.space.Float`, :class:`~autometa.space.Int` or
        :class:`~autometa.space.Categorical`. An algorithm that can adapt none of the
        search's sources is refused with the reason; a pair that cannot work is logged.
        The default: None. Override it for needs a network may not meet (LoRA's target
        layers, parameters to train).
        """
        return None

    @abstractmethod
    def meta_step(self, batch: Episodes) -> float:
        """One meta-update on a batch of meta-train episodes; returns its training loss."""

    @abstractmethod
    def adapt_and_predict(self, episodes: Episodes) -> Tensor:
        """Adapt to each support set, predict each query set.

        Returns (tasks, n_query, output_size); must not change the meta-trained state.
        """

    def adapted_module(self, support_x: Tensor, support_y: Tensor) -> nn.Module | None:
        """The model adapted to one support set, as a module without autometa in it: its
        ``forward`` maps query examples (n, *input_shape) to exactly what
        :meth:`adapt_and_predict` returns for them after adapting on this support set
        (n, output_size), with what adaptation fitted (a head, prototypes, a probe's
        weights, adapted parameters) held as parameters or buffers. None (the default):
        this algorithm cannot give one; ``autometa export`` then writes no ``model.pt2``
        and says so.

        ``autometa export`` calls it in eval mode, under ``torch.no_grad`` and a fixed
        seed, on a target task's train split (the support set meta-test adapts on), and
        traces the module with ``torch.export``: its ``forward`` should use tensor
        operations only, with no Python branch on tensor values. It must not change the
        meta-trained state.

        Args:
            support_x: (n_support, *input_shape) examples, on the task's device.
            support_y: (n_support,) long labels, or (n_support, output_size) targets.
        """
        return None

    def adaptation_modules(self) -> tuple[nn.Module, nn.Module] | None:
        """Adaptation and prediction as two modules without autometa in them, for a
        few-shot task's ``autometa export`` (``adapt.pt2``, ``predict.pt2``): ``adapt``
        maps a support set, ``support_x`` (n, *input_shape) and ``support_y`` (n,) long
        labels ``0..ways-1``, to a tuple of tensors (e.g. class prototypes); ``predict``
        maps query examples (m, *input_shape) and those tensors to what
        :meth:`adapt_and_predict` returns for them (m, output_size). Tensor operations
        only, so that ``torch.export`` traces each. None (the default): adaptation is not
        a fixed program (gradient steps, a solver); ``autometa export`` says so.
        """
        return None

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to reproduce ``adapt_and_predict`` (default: the model)."""
        return {"model": self.model.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
