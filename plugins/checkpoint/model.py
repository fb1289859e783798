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
sets ``trust_pickle=True`` for a file they trust. Accepted layouts: a ``state_dict``, or a
dict holding one under ``"model"`` (autometa's own trial files) or ``"state_dict"``.

Every tensor must fit the architecture, with one exception: when only the head differs
(e.g. a checkpoint trained for 64 classes used on 5-way episodes) and ``replace_head`` is
set, the features are loaded and the head stays freshly initialised for the task.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import pickle
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from autometa import (
    Backbone,
    ConfigError,
    DataError,
    PluginError,
    SourceModel,
    Task,
    TaskSpec,
    create_host,
)

log = logging.getLogger(__name__)

#: Mismatches listed in an error message; the rest are counted.
LISTED = 5


class Checkpoint(SourceModel):
    input_ranks = (1, 2, 3)  # whatever the architecture accepts: checked per instance

    def __init__(
        self,
        *,
        path: str | None = None,  # the local weights file
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
        self.replace_head = replace_head
        self.trust_pickle = trust_pickle
        self._factory = resolve_architecture(arch)
        self._source: SourceModel | None = None
        if isinstance(self._factory, type) and issubclass(self._factory, SourceModel):
            self._source = _call(self._factory, self.arch_params, arch)

    def prepare(self, task: Task) -> None:
        self._check(task.spec, f"task {task.identity.get('task', type(task).__name__)!r}")
        if self._source is not None:
            self._source.prepare(task)

    def build(self, spec: TaskSpec) -> Backbone:
        self._check(spec, "the task")
        model, target = self._architecture(spec)
        state = read_state_dict(self.path, trust_pickle=self.trust_pickle)
        problems = mismatches(target.state_dict(), state)
        if (self.replace_head and target is model and problems
                and all(key.startswith("head.") for key, _ in problems)):
            log.info("checkpoint %s: the head does not fit (%s); keeping a fresh head with "
                     "%d outputs", self.path, problems[0][1], spec.output_size)
            load_weights(target, state, file=self.path, arch=self.arch,
                         ignore=lambda key: key.startswith("head."))
        else:
            load_weights(target, state, file=self.path, arch=self.arch)
        return model

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


def resolve_architecture(arch: str) -> Any:
    """A registered source model's class, or the object a ``"module:attr"`` path names."""
    if ":" not in arch:
        return create_host().get("source", arch).load()  # unknown name: lists the known ones
    module_name, _, attr = arch.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except Exception as exc:
        raise PluginError(
            f"architecture {arch!r} cannot be imported: {type(exc).__name__}: {exc}"
        ) from exc
    if not callable(obj):
        raise PluginError(f"architecture {arch!r} is a {type(obj).__name__}, not a callable")
    return obj


def read_state_dict(path: str | Path, *, trust_pickle: bool = False) -> dict[str, Tensor]:
    """The ``state_dict`` in a local file, read on the CPU with ``weights_only`` loading.

    Raises:
        ConfigError: the file does not exist.
        DataError: it cannot be read, needs pickled code (without ``trust_pickle``), or
            holds no ``state_dict``.
    """
    file = Path(path).expanduser()
    if not file.is_file():
        where = "" if file.is_absolute() else f" (relative to {Path.cwd()})"
        raise ConfigError(f"weights file '{file}' does not exist{where}; set 'path' to a local "
                          "file (nothing is downloaded)")
    try:
        obj = torch.load(file, map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as exc:
        if "weights only load failed" not in str(exc).lower():
            raise DataError(f"cannot read weights file '{file}': {_one_line(exc)}") from exc
        found = re.search(r"GLOBAL (\S+)", str(exc))
        needs = f" ({found.group(1)})" if found else ""
        raise DataError(
            f"weights file '{file}' holds pickled Python objects{needs}, not only tensors; "
            "it is refused because unpickling a file can execute arbitrary code. If you trust "
            "where it came from, set trust_pickle=True to load it anyway"
        ) from None
    except Exception as exc:  # not a torch.save file, truncated, ...
        raise DataError(f"cannot read weights file '{file}': {_one_line(exc)}") from exc
    return _state_dict_of(obj, file)


def _state_dict_of(obj: Any, file: Path) -> dict[str, Tensor]:
    if isinstance(obj, Mapping):
        for key in ("model", "state_dict"):
            if isinstance(obj.get(key), Mapping | nn.Module):
                obj = obj[key]
                break
    if isinstance(obj, nn.Module):  # a whole pickled model (trust_pickle only)
        obj = obj.state_dict()
    if isinstance(obj, Mapping) and obj:
        bad = [k for k, v in obj.items() if not (isinstance(k, str) and isinstance(v, Tensor))]
        if not bad:
            state = dict(obj)
            if all(k.startswith("module.") for k in state):  # saved from DataParallel/DDP
                state = {k.removeprefix("module."): v for k, v in state.items()}
            return state
        found = f"a mapping whose entry {bad[0]!r} is not a tensor (keys: {_keys(obj)})"
    else:
        found = f"a {type(obj).__name__}"
    raise DataError(
        f"weights file '{file}' holds {found}; expected a state_dict (parameter names -> "
        "tensors), or a dict with one under 'model' or 'state_dict'"
    )


def mismatches(
    expected: Mapping[str, Tensor], given: Mapping[str, Tensor]
) -> list[tuple[str, str]]:
    """``(key, problem)`` for every tensor of ``given`` that does not fit ``expected``."""
    problems = []
    for key, tensor in expected.items():
        if key not in given:
            problems.append((key, f"missing {key}"))
        elif given[key].shape != tensor.shape:
            problems.append((key, f"{key} is {list(given[key].shape)} in the file, "
                                  f"{list(tensor.shape)} in the model"))
    problems += [(key, f"unexpected {key}") for key in given if key not in expected]
    return problems


def load_weights(
    module: nn.Module,
    state: Mapping[str, Tensor],
    *,
    file: str | Path,
    arch: str,
    ignore: Callable[[str], bool] = lambda key: False,
) -> None:
    """Copy ``state`` into ``module``; keys for which ``ignore`` holds keep their values.

    Raises:
        ConfigError: one message listing the first tensors that do not fit.
    """
    own = {k: v for k, v in module.state_dict().items() if not ignore(k)}
    given = {k: v for k, v in state.items() if not ignore(k)}
    problems = mismatches(own, given)
    if problems:
        listed = "; ".join(text for _, text in problems[:LISTED])
        more = f" (and {len(problems) - LISTED} more)" if len(problems) > LISTED else ""
        hint = "set 'arch' and its parameters to the architecture the file was saved from"
        if all(key.startswith("head.") for key, _ in problems):
            hint = "set replace_head=True to keep the features and train a fresh head"
        raise ConfigError(
            f"weights file '{file}' does not fit architecture {arch!r}: "
            f"{len(problems)} mismatch(es): {listed}{more}; {hint}"
        )
    module.load_state_dict(given, strict=False)  # the ignored keys keep their values


def feature_dim(net: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Width of ``net``'s output for inputs of ``input_shape`` (one forward pass)."""
    training = net.training
    net.eval()  # no running-statistics update
    with torch.no_grad():
        out = net(torch.zeros(2, *input_shape))  # (2, d)
    net.train(training)
    if out.dim() != 2:
        raise PluginError(
            f"a feature extractor must return (batch, features); {type(net).__name__} returns "
            f"{list(out.shape)} for inputs of shape {[2, *input_shape]}"
        )
    return int(out.shape[1])


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


def _keys(obj: Mapping[Any, Any]) -> str:
    keys = [repr(k) for k in list(obj)[:LISTED]]
    return ", ".join(keys) + (", ..." if len(obj) > LISTED else "")


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"
