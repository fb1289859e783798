"""Checkpoint: an architecture with weights from a local file.

``arch`` names the architecture: a registered source model (``"conv4"``, ``"resnet12"``,
built with ``arch_params`` for the task like any source), or a ``"module:attr"`` path to a
:class:`~autometa.SourceModel` class or to a callable returning a
:class:`~autometa.Backbone` or a plain ``nn.Module``. The callable receives ``arch_params``
as keywords, plus the task's ``spec`` if it has a parameter of that name. A plain module is
the feature extractor, ``(n, *input_shape) -> (n, d)``; a fresh linear head is added and the
file holds the module's own ``state_dict``.

The file is read with ``torch.load(weights_only=True)``: tensors and plain containers only.
Unpickling runs code named in the file, so a file that needs it is refused unless the user
sets ``trust_pickle`` to true (the bool: anything else is a ConfigError) for a file they
trust. Accepted layouts: a ``state_dict``, or a dict holding one under ``"model"``
(autometa's own trial files) or ``"state_dict"``.

The file is read and checked when the source model is constructed (see
:func:`autometa.weights.read_state_dict`: a regular file, loadable, a ``state_dict``, finite
values), which the engine does while preparing a search, so a bad file is refused before
anything is stored; :meth:`Checkpoint.build` reuses the tensors read then. Whether they fit
the architecture built for the task is checked by :meth:`Checkpoint.incompatibility`, which
the engine also calls while preparing, on the instance.

Every tensor must fit the architecture, with one exception: when only the head differs
(e.g. a checkpoint trained for 64 classes used on 5-way episodes) and ``replace_head`` is
set, the features are loaded and the head stays freshly initialised for the task.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from autometa import (
    AutometaError,
    Backbone,
    ConfigError,
    PluginError,
    SourceModel,
    Task,
    TaskSpec,
)
from autometa.weights import (
    check_flag,
    fit_problem,
    load_weights,
    mismatches,
    read_state_dict,
    resolve_architecture,
)

log = logging.getLogger(__name__)


class Checkpoint(SourceModel):
    input_ranks = (1, 2, 3)  # whatever the architecture accepts: checked per instance
    pretrained_features = True  # its weights come from a file: baselines run on them

    def __init__(
        self,
        *,
        path: str | os.PathLike[str] | None = None,  # the local weights file
        arch: str = "conv4",  # registered source model or "module:attr" (see module doc)
        arch_params: Mapping[str, Any] | None = None,  # the architecture's keyword arguments
        replace_head: bool = True,  # fresh head if only the head's shape differs
        trust_pickle: bool = False,  # allow files holding pickled code (trusted files only)
    ) -> None:
        if not path:
            raise ConfigError(
                "checkpoint.path: no weights file given; set it to a local file "
                "(e.g. source_params.checkpoint.path = \"weights.pt\")"
            )
        self.path = Path(path).expanduser()
        self.arch = arch
        self.arch_params = dict(arch_params or {})
        self.replace_head = check_flag("checkpoint.replace_head", replace_head)
        self.trust_pickle = check_flag("checkpoint.trust_pickle", trust_pickle)
        self._factory = resolve_architecture(arch)
        self._source: SourceModel | None = None
        if isinstance(self._factory, type) and issubclass(self._factory, SourceModel):
            self._source = _call(self._factory, self.arch_params, arch)
        # Read now: the engine constructs every source while preparing a search, so a
        # missing, corrupt, pickled or NaN-holding file fails there, not in trial 0.
        self._state = read_state_dict(self.path, trust_pickle=self.trust_pickle,
                                      setting="checkpoint.trust_pickle")

    def incompatibility(self, spec: TaskSpec) -> str | None:  # type: ignore[override]
        """Why this architecture, or the file's tensors, cannot serve ``spec``; else None.

        Called on the instance (the engine does, while preparing): it builds the
        architecture for ``spec`` and compares the file's tensors with it, without
        touching torch's global random generator.
        """
        reason = super().incompatibility(spec)
        if reason is None and self._source is not None:
            reason = self._source.incompatibility(spec)
            if reason:
                return f"uses architecture {self.arch!r}, which {reason}"
        if reason is None:
            try:
                with torch.random.fork_rng(devices=[]):  # the trials' seeding stays untouched
                    problem = self._fit(spec)[3]
            except AutometaError as exc:  # e.g. a feature extractor refusing the inputs
                return f"cannot build architecture {self.arch!r} for the task: {exc}"
            if problem:
                return f"cannot load its weights: {problem}"
        return reason

    def prepare(self, task: Task) -> None:
        self._check(task.spec, f"task {task.identity.get('task', type(task).__name__)!r}")
        if self._source is not None:
            self._source.prepare(task)

    def build(self, spec: TaskSpec) -> Backbone:
        self._check(spec, "the task")
        model, target, ignore, problem = self._fit(spec)
        if problem:
            raise ConfigError(problem)
        if ignore is _head:
            log.info("checkpoint %s: the head does not fit; keeping a fresh head with %d "
                     "outputs", self.path, spec.output_size)
        load_weights(target, self._state, file=self.path, arch=self.arch, ignore=ignore)
        return model

    def _fit(self, spec: TaskSpec
             ) -> tuple[Backbone, nn.Module, Callable[[str], bool], str | None]:
        """The network for ``spec``, the module the file belongs to, the keys left fresh,
        and why the file does not fit (None if it does)."""
        model, target = self._architecture(spec)
        ignore: Callable[[str], bool] = _nothing
        problems = mismatches(target.state_dict(), self._state)
        if (self.replace_head and target is model and problems
                and all(key.startswith("head.") for key, _ in problems)):
            ignore = _head  # only the head differs: fresh head for the task's outputs
        return model, target, ignore, fit_problem(target, self._state, file=self.path,
                                                  arch=self.arch, ignore=ignore)

    def _check(self, spec: TaskSpec, task_name: str) -> None:
        if self._source is not None:
            reason = self._source.incompatibility(spec)
            if reason:
                raise ConfigError(
                    f"checkpoint: architecture {self.arch!r} cannot serve {task_name}: it {reason}"
                )

    def _architecture(self, spec: TaskSpec) -> tuple[Backbone, nn.Module]:
        """The freshly built network, and the module the file's state_dict belongs to."""
        if self._source is not None:
            model = self._source.build(spec)
            return model, model
        kwargs = dict(self.arch_params)
        if "spec" in _parameters(self._factory):
            kwargs["spec"] = spec
        net = _call(self._factory, kwargs, self.arch)
        if isinstance(net, Backbone):
            return net, net
        if isinstance(net, nn.Module):  # a feature extractor: add a head for the task
            head = nn.Linear(feature_dim(net, spec.input_shape), spec.output_size)
            return Backbone(net, head), net
        raise PluginError(
            f"checkpoint.arch {self.arch!r} returned {type(net).__name__}; expected an "
            "nn.Module or an autometa.Backbone"
        )


def feature_dim(net: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Width of ``net``'s output for inputs of ``input_shape`` (one forward pass)."""
    training = net.training
    net.eval()  # no running-statistics update
    try:
        with torch.no_grad():
            out = net(torch.zeros(2, *input_shape))  # (2, d)
    except (RuntimeError, ValueError) as exc:  # shapes that do not fit the network
        lines = str(exc).strip().splitlines()
        raise PluginError(
            f"feature extractor {type(net).__name__} cannot take inputs of shape "
            f"{[2, *input_shape]}: {lines[0] if lines else type(exc).__name__}"
        ) from exc
    finally:
        net.train(training)
    if out.dim() != 2:
        raise PluginError(
            f"a feature extractor must return (batch, features); {type(net).__name__} returns "
            f"{list(out.shape)} for inputs of shape {[2, *input_shape]}"
        )
    return int(out.shape[1])


def _nothing(key: str) -> bool:
    return False


def _head(key: str) -> bool:
    return key.startswith("head.")


def _call(factory: Any, kwargs: Mapping[str, Any], arch: str) -> Any:
    try:
        return factory(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"arch_params {dict(kwargs)} do not fit architecture {arch!r}: "
                          f"{exc}") from exc


def _parameters(factory: Any) -> Mapping[str, Any]:
    try:
        return inspect.signature(factory).parameters
    except (TypeError, ValueError):  # some builtins have no signature
        return {}
