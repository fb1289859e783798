"""The source-model contract: builds the network a meta-algorithm adapts.

A source model turns a :class:`~autometa.task.TaskSpec` (input shape, output size) into a
:class:`Backbone`: a feature extractor followed by a head. Gradient-based algorithms
adapt all of it; head-only algorithms (ANIL, linear probes) adapt the head; metric-based
ones (ProtoNets) use the features alone. A source model may load pretrained weights in
:meth:`SourceModel.build`, from local files only.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

from torch import Tensor, nn

from autometa.space import SearchSpace
from autometa.task import Task, TaskSpec

__all__ = ["Backbone", "SourceModel", "chain_leaves"]


class Backbone(nn.Module):
    """``head(features(x))``, with the split exposed as two submodules."""

    def __init__(self, features: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.features = features  # (n, *input_shape) -> (n, feature_dim)
        self.head = head  # (n, feature_dim) -> (n, output_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def chain_leaves(model: nn.Module) -> list[tuple[str, nn.Module]] | None:
    """The leaf modules (no children) of a chain, in the order its forward runs them, each
    with its parameters' name prefix (``"features.0."``); None where a container is not an
    ``nn.Sequential`` or a :class:`Backbone` (by exact type: a subclass may override
    ``forward``), a module has a hook (forward or backward, its own or a global one), or a
    parameter is reached under two names (a module used twice, tied weights). The inner
    loop's fast paths (:mod:`autometa.stacked`, :mod:`autometa.fused_blocks`) run such
    chains themselves, each leaf with its parameters by name.
    """
    if any(getattr(nn.modules.module, g, None) for g in _GLOBAL_HOOKS):
        return None
    named = list(model.named_parameters(remove_duplicate=False))
    if len({id(p) for _, p in named}) != len(named):
        return None
    return _chain(model, "")


#: torch.nn's registries of hooks on every module (``register_module_forward_hook``, ...).
_GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks",
                 "_global_backward_hooks", "_global_backward_pre_hooks")


def _chain(model: nn.Module, prefix: str) -> list[tuple[str, nn.Module]] | None:
    if (model._forward_hooks or model._forward_pre_hooks or model._backward_hooks
            or model._backward_pre_hooks):
        return None
    kind = type(model)
    if kind is nn.Sequential:  # every entry, a module placed twice too (as forward runs it)
        children = [(n, m) for n, m in model._modules.items() if m is not None]
    elif kind is Backbone:
        children = [("features", model.get_submodule("features")),
                    ("head", model.get_submodule("head"))]
    elif next(model.children(), None) is None:
        return [(prefix, model)]
    else:
        return None
    leaves: list[tuple[str, nn.Module]] = []
    for name, child in children:
        inner = _chain(child, f"{prefix}{name}.")
        if inner is None:
            return None
        leaves += inner
    return leaves


class SourceModel(ABC):
    """Base class of source models.

    Hyperparameters are the keyword arguments of ``__init__`` (with defaults); the ones
    worth searching are declared in :meth:`search_space` with their ranges.
    """

    def __init__(self, **hyperparameters: Any) -> None:
        if hyperparameters:
            raise TypeError(f"unexpected hyperparameters {sorted(hyperparameters)}")

    @classmethod
    def search_space(cls) -> SearchSpace:
        """Hyperparameters to search and their ranges (default: none)."""
        return {}

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """Settings of this source model in a portfolio start; see
        :meth:`autometa.algorithm.MetaAlgorithm.defaults`."""
        from autometa.params import keyword_defaults

        return keyword_defaults(cls)

    #: True if the features are worth using frozen, without meta-training: pre-trained or
    #: loaded weights, or none to train (the ``raw`` inputs). A search then runs the
    #: baseline algorithms (nearest centroid, linear probe, linear SVM) on this source at
    #: its default settings (``baselines = true``, README: Baselines). An instance may set
    #: it from its settings (``torchvision``: true only with a weights file).
    pretrained_features: bool = False

    #: Input ranks accepted: 1 for flat feature vectors, 3 for (C, H, W) images.
    input_ranks: ClassVar[tuple[int, ...]] = (1, 3)

    @classmethod
    def incompatibility(cls, spec: TaskSpec) -> str | None:
        """Why this source model cannot serve ``spec``, or None if it can."""
        if len(spec.input_shape) not in cls.input_ranks:
            return (
                f"accepts inputs of rank {list(cls.input_ranks)}, the task's inputs have "
                f"shape {list(spec.input_shape)}"
            )
        return None

    def prepare(self, task: Task) -> None:
        """Called with the task before :meth:`build` in every trial; default: nothing.

        For work that needs the task's data, such as supervised pre-training on its
        meta-train classes; cache the result on disk (``task.identity`` names the task).
        """
        return None

    @abstractmethod
    def build(self, spec: TaskSpec) -> Backbone:
        """A freshly initialised (or pretrained) network for ``spec``, on the CPU.

        The engine seeds torch's global generator before calling this and moves the
        result to the run's device.
        """
