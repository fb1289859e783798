"""The search engine: an Optuna study over algorithms, source models and their hyperparameters.

Flow: :func:`prepare` validates everything (plugins, task data, hyperparameter overrides)
before the storage is touched; :func:`run_search` opens or resumes the study, runs trials
(:mod:`autometa.trial`) until the budget is spent, and ranks them
(:mod:`autometa.leaderboard`).
"""

from __future__ import annotations

import inspect
import logging
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.trial import FrozenTrial, TrialState

from autometa import __version__
from autometa.config import SearchConfig, check_writable_dir
from autometa.errors import AutometaError, ConfigError, PluginError, one_line, redact, unknown
from autometa.leaderboard import Leaderboard, compute_leaderboard
from autometa.params import declared_types, parse
from autometa.plugins import Kind, PluginHost, create_host
from autometa.progress import NullProgress, Progress
from autometa.space import (
    Categorical,
    Float,
    Int,
    from_json,
    parse_value,
    restrict,
    suggest,
    to_json,
)
from autometa.task import Task
from autometa.trial import Diverged, TrialPlan, build, meta_train, save_state, trial_seed

log = logging.getLogger(__name__)

#: Study user attribute holding the search's settings (for resuming and for reports).
CONFIG_ATTR = "autometa.config"
#: Seconds between heartbeats of a running trial; a trial silent for GRACE is stale.
HEARTBEAT, GRACE = 10, 30


@dataclass
class Prepared:
    """A validated search: the task is built and every plugin is resolved."""

    config: SearchConfig
    host: PluginHost
    task: Task
    algorithms: dict[str, dict[str, Any]]  # name -> restricted search space
    sources: dict[str, dict[str, Any]]


def prepare(config: SearchConfig, host: PluginHost) -> Prepared:
    """Check every input and resolve plugins and the task; raises before anything is stored.

    The returned config holds every task parameter and plugin setting parsed as its
    declared type (:mod:`autometa.params`), so that the study stores typed values.

    Raises:
        ConfigError, DataError, PluginError: the first bad input, one line naming it.
    """
    device = check_device(config.device)
    check_writable_dir(Path(config.artifacts), "artifacts")
    task_params = parse_task_params(config, host)
    task = build_task(config, host, task_params, device)

    def algorithm_problem(cls: Any, space: dict[str, Any]) -> str | None:
        reason = cls.incompatibility(task)
        return f"it {reason} (task {config.task!r})" if reason else None

    def source_problem(cls: Any, space: dict[str, Any]) -> str | None:
        # Set the source up with its fixed settings now, so that a missing setting (a
        # checkpoint's path, an uninstalled library) fails before anything is stored.
        fixed = {k: v for k, v in space.items() if not isinstance(v, Float | Int | Categorical)}
        try:
            source = cls(**fixed)
        except AutometaError as exc:
            return str(exc)
        reason = source.incompatibility(task.spec)
        return f"it {reason} (task {config.task!r})" if reason else None

    algorithms = _choose(host, "algorithm", config.algorithms, config.algorithm_params,
                         algorithm_problem, task)
    sources = _choose(host, "source", config.sources, config.source_params, source_problem,
                      task)
    typed = replace(
        config,
        task_params=task_params,
        algorithm_params={n: _overrides(s, config.algorithm_params.get(n, {}))
                          for n, s in algorithms.items() if n in config.algorithm_params},
        source_params={n: _overrides(s, config.source_params.get(n, {}))
                       for n, s in sources.items() if n in config.source_params},
    )
    return Prepared(typed, host, task, algorithms, sources)


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
    """``config.task_params`` parsed as the task's declared types and checked (ranges,
    choices, required parameters)."""
    task_cls = host.get("task", config.task).load()
    types = declared_types(task_cls, skip=frozenset({"seed", "device"}))
    params: dict[str, Any] = {}
    for name, value in config.task_params.items():
        if name not in types:
            raise ConfigError(unknown(f"parameter of task {config.task!r}", name, types))
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


def build_task(config: SearchConfig, host: PluginHost, task_params: Mapping[str, Any],
               device: torch.device) -> Task:
    """Build the task once for the whole search (data live on ``device``).

    ``task_params`` must come from :func:`parse_task_params`. A task that raises anything
    but an autometa error is a plugin bug, reported as one :class:`PluginError` line.
    """
    task_cls = host.get("task", config.task).load()
    try:
        task: Task = task_cls(**task_params, seed=config.seed, device=device)
    except AutometaError:
        raise
    except Exception as exc:
        raise PluginError(f"task {config.task!r} could not be built with {dict(task_params)}: "
                          f"{type(exc).__name__}: {one_line(str(exc))}") from exc
    task.identity = {"task": config.task, "params": dict(task_params), "seed": config.seed}
    return task


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

    Plugins asked for by name must work (else an error); of the others, those that cannot
    load, whose own code raises, or that ``problem`` rejects are left out with a log line.
    """
    label = "algorithm" if kind == "algorithm" else "source model"
    names = requested or host.names(kind)
    chosen: dict[str, dict[str, Any]] = {}
    for name in names:
        try:
            reg = host.get(kind, name)
            declared = reg.declared(task)  # loads it; PluginError if it or its space fails
            cls = reg.load()
            space = restrict(name, declared, overrides.get(name, {}),
                             settable=declared_types(cls, skip=ENGINE_ARGUMENTS))
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


def run_search(
    config: SearchConfig,
    *,
    host: PluginHost | None = None,
    progress: Progress | None = None,
    ready: Callable[[], None] = lambda: None,
) -> Leaderboard:
    """Run (or resume) the search described by ``config`` and return its leaderboard.

    Args:
        ready: called once every input is checked and the study is open, before the first
            trial (the CLI then lets held log lines through).

    Raises:
        ConfigError, DataError, PluginError: a bad input, before anything is stored.
    """
    host = host or create_host()
    threads = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    try:
        return _run(config, host, progress, ready)
    finally:
        torch.set_num_threads(threads)


def _run(config: SearchConfig, host: PluginHost, progress: Progress | None,
         ready: Callable[[], None]) -> Leaderboard:
    prepared = prepare(config, host)
    config = prepared.config
    study = _open_study(prepared)
    ready()
    progress = progress or NullProgress()
    artifacts = Path(study.user_attrs[CONFIG_ATTR]["artifacts_path"])

    done = sum(1 for t in study.trials if _counts(t))
    remaining = None if config.n_trials is None else max(config.n_trials - done, 0)
    host.notify("search_started", study_name=study.study_name, config=config)

    def objective(trial: optuna.Trial) -> float:
        plan = TrialPlan(
            algorithm=trial.suggest_categorical("algorithm", list(prepared.algorithms)),
            source=trial.suggest_categorical("source", list(prepared.sources)),
        )
        plan = TrialPlan(
            plan.algorithm,
            plan.source,
            suggest(trial, plan.algorithm, prepared.algorithms[plan.algorithm]),
            suggest(trial, plan.source, prepared.sources[plan.source]),
        )
        for key, value in vars(plan).items():
            trial.set_user_attr(key, value)
        progress.trial_started(trial.number, plan.describe(), config.meta_steps)
        seed = trial_seed(config.seed, trial.number)
        generator = torch.Generator(device=prepared.task.device).manual_seed(seed)

        def on_eval(step: int, score: float) -> None:
            trial.report(score, step)
            if trial.should_prune():
                raise optuna.TrialPruned(f"meta-val {score:.4g} at step {step}")

        try:
            algorithm = build(host, prepared.task, plan, seed)
            score = meta_train(algorithm, prepared.task, meta_steps=config.meta_steps,
                               eval_every=config.eval_every, generator=generator,
                               on_eval=on_eval, on_step=progress.step)
            save_state(algorithm, artifacts / f"trial-{trial.number}.pt")
        except optuna.TrialPruned:
            raise
        except Diverged as exc:
            return _failed(trial, f"diverged: {exc}")
        except Exception as exc:  # this trial's data, hyperparameters or plugin code
            log.debug("trial %d failed", trial.number, exc_info=True)
            return _failed(trial, f"{type(exc).__name__}: {redact(one_line(str(exc)))}")
        return score

    def after_trial(study: optuna.Study, frozen: FrozenTrial) -> None:
        note = frozen.user_attrs.get("failure", "")
        if frozen.state == TrialState.PRUNED and frozen.intermediate_values:
            step = max(frozen.intermediate_values)
            note = f"at step {step}, meta-val {frozen.intermediate_values[step]:.4g}"
        progress.trial_finished(frozen.number, frozen.state.name, frozen.value, _best(study),
                                note)
        host.notify("trial_finished", study_name=study.study_name, trial=frozen)

    with progress:
        progress.search_started(remaining, done, config.timeout, prepared.task.metric.name)
        if remaining != 0:
            study.optimize(objective, n_trials=remaining, timeout=config.timeout,
                           callbacks=[after_trial])
    leaderboard = compute_leaderboard(study, prepared.task, host, top_k=config.top_k,
                                      artifacts=artifacts)
    host.notify("search_finished", study_name=study.study_name, leaderboard=leaderboard)
    return leaderboard


def _failed(trial: optuna.Trial, reason: str) -> float:
    """Record why ``trial`` failed; the NaN it returns makes Optuna mark it FAIL and go on."""
    trial.set_user_attr("failure", reason[:1000])
    return float("nan")


def _counts(trial: FrozenTrial) -> bool:
    """Trials that use up budget: finished ones, except crashed trials that are retried."""
    if trial.state in (TrialState.COMPLETE, TrialState.PRUNED):
        return True
    return trial.state == TrialState.FAIL and "failure" in trial.user_attrs


def _best(study: optuna.Study) -> float | None:
    values = [t.value for t in study.trials if t.state == TrialState.COMPLETE]
    if not values:
        return None
    assert all(v is not None for v in values)
    return min(values) if study.direction.name == "MINIMIZE" else max(values)  # type: ignore


def open_storage(url: str, *, must_exist: bool = False) -> optuna.storages.BaseStorage:
    """Open an Optuna storage URL; RDB storages get heartbeats so crashed trials are retried.

    Args:
        must_exist: for read-only commands: a SQLite file that does not exist is an error
            instead of being created.

    Raises:
        ConfigError: one line naming the URL with its password replaced by ``***``.
    """
    shown = redact(url)
    scheme = url.split(":", 1)[0].split("+", 1)[0] if "://" in url else ""
    if must_exist and scheme == "sqlite":
        path = url.split(":///", 1)[1] if ":///" in url else ""
        if path and path != ":memory:" and not Path(path).is_file():
            raise ConfigError(f"storage: no database at {path!r} ({shown}); run a search first "
                              "or give --storage")
    try:
        if scheme in {"sqlite", "postgresql", "mysql"}:
            warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(
                url,
                heartbeat_interval=HEARTBEAT,
                grace_period=GRACE,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
                    max_retry=2
                ),
            )
        return optuna.storages.get_storage(url)
    except Exception as exc:
        reason = redact(one_line(str(getattr(exc, "orig", None) or exc)))
        if len(reason) > 200:
            reason = reason[:197] + "..."
        raise ConfigError(f"storage: cannot open {shown}: {reason}; check the URL, that the "
                          "server is reachable and its driver installed (e.g. "
                          "sqlite:///autometa.db)") from None


def _open_study(prepared: Prepared) -> optuna.Study:
    config = prepared.config
    storage = open_storage(config.storage)
    name = config.study
    sampler = _sampler(config.seed)
    pruner: optuna.pruners.BasePruner = (
        optuna.pruners.MedianPruner(n_startup_trials=5) if config.pruner == "median"
        else optuna.pruners.NopPruner()
    )
    try:
        study = optuna.load_study(study_name=name, storage=storage, sampler=sampler,
                                  pruner=pruner)
    except KeyError:
        study = None
    if study is not None:
        stored = study.user_attrs.get(CONFIG_ATTR)
        if stored is None:
            raise ConfigError(f"study {name!r} in {redact(config.storage)} was not made by "
                              "autometa; choose another study name")
        if stored["fingerprint"] != _jsonable(config.fingerprint()):
            diff = _diff(stored["fingerprint"], _jsonable(config.fingerprint()))
            raise ConfigError(
                f"study {name!r} in {redact(config.storage)} was run with other settings "
                f"({diff}); "
                "use the original settings to resume it, or a new study name"
            )
        if "spaces" in stored:
            _use_stored_spaces(prepared, stored["spaces"], name)
        log.info("resuming study %r (%d trials so far)", name, len(study.trials))
        return study
    study = optuna.create_study(storage=storage, study_name=name, sampler=sampler,
                                pruner=pruner, direction=prepared.task.metric.direction)
    artifacts = (Path(config.artifacts) / name).resolve()
    study.set_user_attr(CONFIG_ATTR, {
        "autometa_version": __version__,
        "config": _jsonable(config.to_dict()),
        "fingerprint": _jsonable(config.fingerprint()),
        "artifacts_path": str(artifacts),
        "task": prepared.task.describe(),
        # The plugins and spaces this search resolved: a resume uses exactly these, so a
        # plugin installed or upgraded since cannot change the space Optuna samples from.
        "spaces": {"algorithm": {n: to_json(s) for n, s in prepared.algorithms.items()},
                   "source": {n: to_json(s) for n, s in prepared.sources.items()}},
    })
    return study


def _use_stored_spaces(prepared: Prepared, spaces: Mapping[str, Any], study: str) -> None:
    """Replace the freshly resolved plugins and spaces by those ``study`` was created with.

    Raises:
        ConfigError: a plugin the study searched is no longer installed or usable.
    """
    kinds: tuple[tuple[Kind, str], ...] = (("algorithm", "algorithms"), ("source", "sources"))
    for kind, attr in kinds:
        for name in spaces[kind]:
            try:
                prepared.host.get(kind, name).load()
            except PluginError as exc:
                raise ConfigError(f"study {study!r} searched {kind} {name!r}, which is not "
                                  f"usable now ({exc}); reinstall it to resume, or start a new "
                                  "study") from None
        setattr(prepared, attr, {n: from_json(s) for n, s in spaces[kind].items()})


def _sampler(seed: int) -> optuna.samplers.BaseSampler:
    with warnings.catch_warnings():  # multivariate/group TPE are flagged experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True)


def _jsonable(value: Any) -> Any:
    """Round-trip through JSON types so that stored and fresh settings compare equal."""
    import json

    return json.loads(json.dumps(value))


def _diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    changed = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
               if old.get(k) != new.get(k)]
    return "; ".join(changed)


def search(task: str, **settings: Any) -> Leaderboard:
    """Run an autometa search from Python and return its leaderboard.

    Args:
        task: task plugin name, e.g. ``"sinusoid"``.
        **settings: any :class:`SearchConfig` field (``algorithms``, ``sources``,
            ``n_trials``, ``seed``, ``meta_steps``, ``storage``, ...), plus ``host`` (a
            :class:`PluginHost`, default: the installed plugins) and ``progress`` (True
            to draw progress bars on stderr).

    Example:
        >>> board = autometa.search("sinusoid", algorithms=["maml", "finetune"],
        ...                         sources=["mlp"], n_trials=10, seed=0)
        >>> board.frame.head()
    """
    host = settings.pop("host", None)
    show = settings.pop("progress", False)
    config = SearchConfig.from_dict({"task": task, **settings}, where="search()")
    if show:
        from autometa.progress import RichProgress

        return run_search(config, host=host, progress=RichProgress())
    return run_search(config, host=host)
