"""A search's task built from its settings: the task's parameters parsed as its declared
types, the device checked, the task built once on it. The engine builds the task of a new
search this way, and a stored study's is rebuilt the same way on any machine.

``task_params`` also holds the task's per-trial settings (``Task.trial_params``): they are
split off here, never passed to the constructor, and become the space each trial's values
are drawn from (:func:`task_trial_space`).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from autometa.config import SearchConfig
from autometa.errors import AutometaError, ConfigError, PluginError, one_line, unknown
from autometa.params import TASK_ENGINE_ARGUMENTS, declared_types, parse
from autometa.plugins import PluginHost
from autometa.space import SearchSpace, parse_value, restrict
from autometa.study.inputs import localize
from autometa.task import Task

#: Task constructor arguments the engine supplies (``cache_dir`` only to a task that
#: takes it): never task parameters a user sets.
ENGINE_SUPPLIED = TASK_ENGINE_ARGUMENTS


def check_device(text: str) -> torch.device:
    """The torch device ``text`` names, checked by placing a tensor on it.

    Raises:
        ConfigError: not a device name, ``meta`` (holds no data), or not usable here
            (``cuda:9`` with one GPU, ``cuda`` on a CPU-only build of torch).
    """
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise ConfigError(f"device: {text!r} is not a torch device; use e.g. 'cpu', 'cuda' or "
                          "'cuda:0'") from None
    if device.type == "meta":
        raise ConfigError("device: 'meta' tensors hold no data; use 'cpu' or 'cuda:N'")
    try:
        torch.zeros(1, device=device)
    except Exception as exc:
        available = "cpu" + (f", cuda:0..{torch.cuda.device_count() - 1}"
                             if torch.cuda.is_available() else "")
        raise ConfigError(f"device: {text!r} cannot be used here ({one_line(str(exc))}); "
                          f"available: {available}") from None
    return device


def parse_task_params(config: SearchConfig, host: PluginHost) -> dict[str, Any]:
    """The task's constructor parameters among ``config.task_params``, parsed as its
    declared types and checked (ranges, choices, required parameters); its per-trial
    settings are left to :func:`task_trial_space`."""
    task_cls = host.get("task", config.task).load()
    types = declared_types(task_cls, skip=ENGINE_SUPPLIED)
    per_trial = declared_trial_params(task_cls)
    params: dict[str, Any] = {}
    for name, value in config.task_params.items():
        if name in per_trial:
            continue
        if name not in types:
            raise ConfigError(unknown(f"parameter of task {config.task!r}", name,
                                      {*types, *per_trial}))
        key = f"task_params.{name}"
        params[name] = (parse_value(key, task_cls.params[name], value)
                        if name in task_cls.params else parse(key, types[name], value))
    signature = inspect.signature(task_cls).parameters
    missing = [n for n in types if signature[n].default is signature[n].empty
               and n not in params]
    if missing:
        raise ConfigError(f"task {config.task!r} needs {', '.join(map(repr, missing))}; set "
                          f"{' '.join(f'--task-param {n}=...' for n in missing)} (or "
                          "task_params in a config file)")
    return params


def task_trial_space(config: SearchConfig, host: PluginHost) -> dict[str, Any]:
    """The task's per-trial settings as this search draws them: ``{name: Param}`` for a
    searched one, ``{name: value}`` for a fixed one.

    A ``task_params`` entry named in the task's ``trial_params`` takes the syntax of an
    algorithm's hyperparameter (a value, a list of choices, ``{low, high}``); a setting
    not given is fixed at its default, so a search that names none samples as before.

    Raises:
        ConfigError: a value outside the setting's declared type or range.
        PluginError: a setting without a default, or also a constructor parameter.
    """
    task_cls = host.get("task", config.task).load()
    declared = declared_trial_params(task_cls)
    defaults = trial_defaults(task_cls)
    both = set(declared) & set(declared_types(task_cls, skip=ENGINE_SUPPLIED))
    if both:
        raise PluginError(f"task {config.task!r} declares {', '.join(map(repr, sorted(both)))} "
                          "both in trial_params and as a constructor parameter; a per-trial "
                          "setting is not a constructor argument: remove one")
    given = {n: v for n, v in config.task_params.items() if n in declared}
    restricted = restrict("task_params", declared, given)
    return {name: restricted[name] if name in given else defaults[name] for name in declared}


def trial_defaults(task: Task | type[Task]) -> dict[str, Any]:
    """``{name: default}`` of a task's ``trial_params``: the class attributes of those names.

    Raises:
        PluginError: a setting without a class attribute of its name.
    """
    cls = task if isinstance(task, type) else type(task)
    declared = declared_trial_params(cls)
    missing = [n for n in declared if not hasattr(cls, n)]
    if missing:
        raise PluginError(f"task {cls.__module__}.{cls.__qualname__} declares "
                          f"{', '.join(map(repr, missing))} in trial_params without a default; "
                          f"set a class attribute of that name, e.g. {missing[0]} = ...")
    return {n: getattr(cls, n) for n in declared}


def declared_trial_params(task_cls: Any) -> SearchSpace:
    """A registered task's ``trial_params`` (none for a factory that is no ``Task``)."""
    space: SearchSpace = getattr(task_cls, "trial_params", {})
    return space


def build_task(config: SearchConfig, host: PluginHost, task_params: Mapping[str, Any],
               device: torch.device) -> Task:
    """Build the task once for the whole search (data live on ``device``).

    ``task_params`` must come from :func:`parse_task_params`; relative input paths among
    them resolve against ``config.data_root``. A task that raises anything but an autometa
    error is a plugin bug, reported as one :class:`PluginError` line.
    """
    task_cls = host.get("task", config.task).load()
    local = localize(task_cls, task_params,
                     Path(config.data_root) if config.data_root is not None else None)
    try:
        machine: dict[str, Any] = {}
        if "cache_dir" in inspect.signature(task_cls).parameters:
            machine["cache_dir"] = config.cache_dir
        task: Task = task_cls(**local, seed=config.seed, device=device, **machine)
    except AutometaError:
        raise
    except Exception as exc:
        raise PluginError(f"task {config.task!r} could not be built with {dict(task_params)}: "
                          f"{type(exc).__name__}: {one_line(str(exc))}") from exc
    task.identity = {"task": config.task, "params": dict(task_params), "seed": config.seed}
    return task
