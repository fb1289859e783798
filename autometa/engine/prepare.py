"""Preparation: every input of a search checked, the task built and the plugins resolved,
before anything is stored."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from autometa.cache import cache_dir
from autometa.caveats import few_class_sets
from autometa.config import SearchConfig
from autometa.engine.sampling import WILCOXON_STARTUP, strategy
from autometa.engine.warm_start import read_warm_start
from autometa.errors import AutometaError, ConfigError, PluginError
from autometa.params import declared_types, keyword_defaults
from autometa.plugins import Kind, PluginHost
from autometa.precision import check_supported, precision_choices
from autometa.space import Categorical, Float, Int, restrict
from autometa.study.agreement import check_agreement, read_stored
from autometa.study.artifacts import check_location
from autometa.study.baselines import NOT_SEARCHED_BY_DEFAULT
from autometa.study.build import build_task, check_device, parse_task_params, task_trial_space
from autometa.study.inputs import check_same, fingerprints, localize, path_settings, root_of
from autometa.study.storage import study_exists
from autometa.task import Task

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    """A validated search: the task is built and every plugin is resolved."""

    config: SearchConfig
    host: PluginHost
    task: Task
    algorithms: dict[str, dict[str, Any]]  # name -> restricted search space
    sources: dict[str, dict[str, Any]]
    # the task's per-trial settings (Task.trial_params): {name: Param (searched) or value}
    task_space: dict[str, Any] = field(default_factory=dict)
    #: input files by setting: {"task_params.path": {"path": as given, "sha256": ...}}
    inputs: dict[str, dict[str, str]] = field(default_factory=dict)
    root: Path | None = None  # relative input paths resolve here (None: working directory)
    # per earlier study, (origin, TrialPlan) of its ranked trials, best first: the
    # configurations a new study runs first (engine.initial, read by engine.warm_start)
    warm: list[tuple[str, list[tuple[str, Any]]]] = field(default_factory=list)


def prepare(config: SearchConfig, host: PluginHost,
            expected_inputs: Mapping[str, Mapping[str, str]] | None = None, *,
            check_options: bool = True) -> Prepared:
    """Check every input and resolve plugins and the task; raises before anything is stored.

    The returned config holds every task parameter and plugin setting parsed as its
    declared type (:mod:`autometa.params`), so that the study stores typed values.

    Args:
        expected_inputs: the input files' hashes stored by the study this process joins
            (:mod:`autometa.study.inputs`); a copy that differs or is missing is refused
            before the task is built.
        check_options: refuse options for a plugin that is not loaded, and an existing
            study whose versions or spaces this machine's plugins do not agree with
            (False in a pool's worker process: its host has the installed plugins only,
            while the search's process checked both against its own, in-process plugins
            included).

    Raises:
        ConfigError, DataError, PluginError: the first bad input, one line naming it; an
            existing study made with another autometa or plugin version, or with spaces
            the installed plugins do not accept (:mod:`autometa.study.agreement`).
    """
    if check_options:  # a pool's workers run on the installation their supervisor checked
        # First: a task built by another version of its plugin may fail in its own way.
        check_agreement(read_stored(config.storage, config.study), host, config.study)
    devices = resolve_devices(config)
    device = torch.device(devices[0])
    for name in devices:  # bf16 on a GPU without it: refused before anything is stored
        check_supported(precision_choices(config.precision), torch.device(name))
    check_location(config.artifacts)
    task_params = parse_task_params(config, host)
    task_space = task_trial_space(config, host)
    root = root_of(config.data_root)  # where input files are hashed
    # Plugins get relative paths as written, or resolved against data_root when it is given.
    data_root = Path(config.data_root) if config.data_root is not None else None
    paths = path_settings(host.get("task", config.task).load(), task_params, "task_params")
    memo = cache_dir(config.cache_dir)  # hashes of unchanged files are not read again
    inputs = fingerprints(paths, root, memo)
    if expected_inputs is not None:
        check_same(expected_inputs, inputs, paths, root, config.study)
    task = build_task(config, host, task_params, device)
    little = few_class_sets(task)
    if little and check_options and expected_inputs is None:  # once: the search's process
        log.warning("task %r: %s", config.task, little)
    check_pruner(config, task)
    # A plugin's sampler or pruner is built once here: an unknown name or a failing
    # factory is one line before anything is stored.
    strategy(config, host, task.metric.direction)
    if check_options:
        host.check_options(config.plugins)

    def algorithm_problem(cls: Any, space: dict[str, Any]) -> str | None:
        reason = cls.incompatibility(task)
        return f"it {reason} (task {config.task!r})" if reason else None

    made: dict[Any, Any] = {}  # source class -> its instance with the fixed settings

    def source_problem(cls: Any, space: dict[str, Any]) -> str | None:
        # Set the source up with its fixed settings now, so that a missing setting (a
        # checkpoint's path, an uninstalled library) fails before anything is stored.
        fixed = {k: v for k, v in space.items() if not isinstance(v, Float | Int | Categorical)}
        try:
            source = made[cls] = cls(**localize(cls, fixed, data_root))
        except AutometaError as exc:
            return str(exc)
        reason = source.incompatibility(task.spec)
        return f"it {reason} (task {config.task!r})" if reason else None

    algorithms = _choose(host, "algorithm", config.algorithms, config.algorithm_params,
                         algorithm_problem, task)
    sources = _choose(host, "source", config.sources, config.source_params, source_problem,
                      task)
    if expected_inputs is None:  # the search's process (a joining worker's study exists)
        networks = {name: made.get(host.get("source", name).load()) for name in sources}
        _check_pairs(host, task, algorithms, networks, bool(config.algorithms))
    plugin_paths: dict[str, str] = {}
    kinds: tuple[tuple[Kind, dict[str, dict[str, Any]]], ...] = (
        ("algorithm", algorithms), ("source", sources))
    for kind, chosen in kinds:
        for name, space in chosen.items():
            fixed = {k: v for k, v in space.items()
                     if not isinstance(v, Float | Int | Categorical)}
            plugin_paths |= path_settings(host.get(kind, name).load(), fixed,
                                          f"{kind}_params.{name}")
    inputs |= fingerprints(plugin_paths, root, cache_dir(config.cache_dir))
    if expected_inputs is not None:
        check_same(expected_inputs, inputs, plugin_paths, root, config.study)
    typed = replace(
        config,
        device=devices[0],
        devices=devices,
        task_params={**task_params,
                     **_overrides(task_space, {n: v for n, v in config.task_params.items()
                                               if n in task_space})},
        algorithm_params={n: _overrides(s, config.algorithm_params.get(n, {}))
                          for n, s in algorithms.items() if n in config.algorithm_params},
        source_params={n: _overrides(s, config.source_params.get(n, {}))
                       for n, s in sources.items() if n in config.source_params},
    )
    warm = []
    if config.warm_start and expected_inputs is None:  # a joining worker never creates
        if not study_exists(config.storage, config.study):  # queued only at creation
            warm = read_warm_start(config)
    return Prepared(typed, host, task, algorithms, sources, task_space, inputs, data_root,
                    warm)


def _check_pairs(host: PluginHost, task: Task, algorithms: dict[str, dict[str, Any]],
                 sources: Mapping[str, Any], requested: bool) -> None:
    """Ask each algorithm whether it can adapt each source's network
    (:meth:`~autometa.algorithm.MetaAlgorithm.model_incompatibility`; LoRA's target layers,
    parameters to train), the network built once here for the task. An algorithm that can
    adapt none of them is refused if named (else left out of ``algorithms``); a pair that
    cannot work is logged (its trials will fail with the reason). A source whose network
    cannot be built yet (``pretrained`` pre-trains first) is not checked.
    """
    networks = {}
    for name, source in sources.items():
        try:
            with torch.random.fork_rng(devices=[]):  # the trials' seeding is left alone
                networks[name] = source.build(task.spec)
        except Exception:  # the trial reports it; not every source builds before prepare()
            log.debug("source %r not built while preparing", name, exc_info=True)
    if not networks:
        return
    for name in list(algorithms):
        reg = host.get("algorithm", name)
        cls = reg.load()
        settings = {**keyword_defaults(cls), **algorithms[name]}
        with reg.guard("raised when asked whether it can adapt a source model"):
            reasons = {s: cls.model_incompatibility(model, settings)
                       for s, model in networks.items()}
        bad = {s: r for s, r in reasons.items() if r}
        if bad and len(bad) == len(networks) == len(sources):
            source, reason = next(iter(bad.items()))
            if requested:
                raise ConfigError(f"algorithm {name!r} cannot adapt source model {source!r}"
                                  f" here: {reason}" if len(bad) == 1 else
                                  f"algorithm {name!r} cannot adapt any source model of "
                                  f"the search ({source!r}: {reason})")
            log.info("leaving algorithm %r out of the search: it cannot adapt %s (%s)",
                     name, ", ".join(map(repr, bad)), reason)
            del algorithms[name]
            continue
        for source, reason in bad.items():
            log.warning("trials of algorithm %r on source model %r will fail: %s", name,
                        source, reason)


def _overrides(space: Mapping[str, Any], given: Mapping[str, Any]) -> dict[str, Any]:
    """The user's overrides of one plugin as parsed (fixed values, lists, ranges)."""
    out: dict[str, Any] = {}
    for name in given:
        p = space[name]
        if isinstance(p, Categorical):
            out[name] = list(p.choices)
        elif isinstance(p, Float | Int):
            out[name] = {"low": p.low, "high": p.high}
        else:
            out[name] = p
    return out


def check_pruner(config: SearchConfig, task: Task) -> None:
    """Raise :class:`ConfigError` if the Wilcoxon pruner has too few meta-val episodes to
    pair (a target dataset's val split is one episode)."""
    if config.pruner != "wilcoxon":
        return
    n = len(task.meta_val())
    if n <= WILCOXON_STARTUP:
        raise ConfigError(f"pruner 'wilcoxon' pairs trials over meta-val episodes and needs "
                          f"more than {WILCOXON_STARTUP}; task {config.task!r} has {n}; use "
                          "pruner 'hyperband' or 'median'")


def resolve_devices(config: SearchConfig) -> list[str]:
    """The devices trials run on (``devices``, else ``[device]``), each checked.

    ``"cuda"`` stands for every visible GPU (``cuda:0``, ``cuda:1``, ...).

    Raises:
        ConfigError: a device that cannot be used here (see :func:`check_device`).
    """
    out: list[str] = []
    for text in config.devices or [config.device]:
        if text == "cuda" and torch.cuda.is_available():
            out += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
        else:
            out.append(str(check_device(text)))
    return out


#: Constructor parameters the engine passes itself, never user settings.
ENGINE_ARGUMENTS = frozenset({"self", "model", "task"})


def _choose(
    host: PluginHost,
    kind: Any,
    requested: list[str],
    overrides: Mapping[str, Mapping[str, Any]],
    problem: Callable[[Any, dict[str, Any]], str | None],
    task: Task,
) -> dict[str, dict[str, Any]]:
    """The plugins of ``kind`` in the search, each with its restricted search space.

    Plugins asked for by name must work (else an error). Asked for none, every installed
    one but :data:`~autometa.study.baselines.NOT_SEARCHED_BY_DEFAULT` and those whose class
    sets ``searched_by_default = False``; of those, any that
    cannot load, whose own code raises, or that ``problem`` rejects are left out with a log line.
    """
    label = "algorithm" if kind == "algorithm" else "source model"
    names = requested or [n for n in host.names(kind)
                          if n not in NOT_SEARCHED_BY_DEFAULT[kind]]
    chosen: dict[str, dict[str, Any]] = {}
    for name in names:
        try:
            reg = host.get(kind, name)
            declared = reg.declared(task)  # loads it; PluginError if it or its space fails
            cls = reg.load()
            if not requested and not getattr(cls, "searched_by_default", True):
                log.info("leaving %s %r out of the search: it runs only when named "
                         "(searched_by_default is False)", label, name)
                continue
            space = restrict(name, declared, overrides.get(name, {}),
                             settable=declared_types(cls, skip=ENGINE_ARGUMENTS),
                             defaults=keyword_defaults(cls))
            with reg.guard("raised when checked against the task"):
                reason = problem(cls, space)
        except PluginError as exc:
            if requested or host.strict:
                raise
            log.warning("leaving %s %r out of the search: %s", label, name, exc)
            continue
        if reason:
            if requested:
                raise ConfigError(f"{label} {name!r} cannot be used here: {reason}")
            log.info("leaving %s %r out of the search: %s", label, name, reason)
            continue
        chosen[name] = space
    for name in overrides:
        if name not in chosen:
            raise ConfigError(
                f"{kind}_params has settings for {name!r}, which is not in the search; "
                f"searched: {', '.join(chosen) or 'none'}"
            )
    if not chosen:
        raise PluginError(f"no installed {label} is compatible with this task")
    return chosen
