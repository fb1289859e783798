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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.trial import FrozenTrial, TrialState

from autometa import __version__
from autometa.config import SearchConfig
from autometa.errors import AutometaError, ConfigError, PluginError, unknown
from autometa.leaderboard import Leaderboard, compute_leaderboard
from autometa.plugins import PluginHost, create_host
from autometa.progress import NullProgress, Progress
from autometa.space import Categorical, Float, Int, check_value, restrict, suggest
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
    """Resolve plugins and build the task; raises before anything is stored."""
    task = build_task(config, host)

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
    return Prepared(config, host, task, algorithms, sources)


def build_task(config: SearchConfig, host: PluginHost) -> Task:
    """Build the task once for the whole search (data live on ``config.device``)."""
    task_cls = host.get("task", config.task).load()
    parameters = {n: p for n, p in inspect.signature(task_cls).parameters.items()
                  if n not in {"seed", "device"}}
    for name, value in config.task_params.items():
        if name not in parameters:
            raise ConfigError(unknown(f"parameter of task {config.task!r}", name, parameters))
        if name in task_cls.params:
            check_value(f"task_params.{name}", task_cls.params[name], value)
    missing = [n for n, p in parameters.items()
               if p.default is p.empty and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
               and n not in config.task_params]
    if missing:
        raise ConfigError(f"task {config.task!r} needs {', '.join(map(repr, missing))}; set "
                          f"{' '.join(f'--task-param {n}=...' for n in missing)} (or "
                          "task_params in a config file)")
    try:
        device = torch.device(config.device)
    except RuntimeError as exc:
        raise ConfigError(f"device: {exc}") from exc
    task: Task = task_cls(**config.task_params, seed=config.seed, device=device)
    task.identity = {"task": config.task, "params": config.task_params, "seed": config.seed}
    return task


def keyword_parameters(cls: type) -> list[str]:
    """Keyword parameters of a plugin class's constructor (its hyperparameters)."""
    skip = {"self", "model", "task"}
    return [n for n, p in inspect.signature(cls).parameters.items()
            if n not in skip and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]


def declared_space(cls: Any, task: Task) -> Any:
    """``cls.search_space(task)`` if it takes the task (a space that depends on the task's
    kind), else ``cls.search_space()``."""
    if "task" in inspect.signature(cls.search_space).parameters:
        return cls.search_space(task=task)
    return cls.search_space()


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
    load or ``problem`` rejects are left out with a log message.
    """
    label = "algorithm" if kind == "algorithm" else "source model"
    names = requested or host.names(kind)
    chosen: dict[str, dict[str, Any]] = {}
    for name in names:
        try:
            cls = host.get(kind, name).load()
        except PluginError as exc:
            if requested or host.strict:
                raise
            log.warning("leaving %s %r out of the search: %s", label, name, exc)
            continue
        space = restrict(name, declared_space(cls, task), overrides.get(name, {}),
                         settable=keyword_parameters(cls))
        reason = problem(cls, space)
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
    config: SearchConfig, *, host: PluginHost | None = None, progress: Progress | None = None
) -> Leaderboard:
    """Run (or resume) the search described by ``config`` and return its leaderboard."""
    host = host or create_host()
    threads = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    try:
        return _run(config, host, progress)
    finally:
        torch.set_num_threads(threads)


def _run(config: SearchConfig, host: PluginHost, progress: Progress | None) -> Leaderboard:
    prepared = prepare(config, host)
    study = _open_study(prepared)
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
        algorithm = build(host, prepared.task, plan, seed)
        generator = torch.Generator(device=prepared.task.device).manual_seed(seed)

        def on_eval(step: int, score: float) -> None:
            trial.report(score, step)
            if trial.should_prune():
                raise optuna.TrialPruned(f"meta-val {score:.4g} at step {step}")

        try:
            score = meta_train(algorithm, prepared.task, meta_steps=config.meta_steps,
                               eval_every=config.eval_every, generator=generator,
                               on_eval=on_eval, on_step=progress.step)
        except Diverged as exc:
            trial.set_user_attr("failure", f"diverged: {exc}")
            return float("nan")  # Optuna records the trial as failed and goes on
        save_state(algorithm, artifacts / f"trial-{trial.number}.pt")
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


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """Open an Optuna storage URL; RDB storages get heartbeats so crashed trials are retried."""
    try:
        if url.split(":", 1)[0].split("+", 1)[0] in {"sqlite", "postgresql", "mysql"}:
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
        raise ConfigError(f"storage: cannot open {url!r}: {exc}") from exc


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
            raise ConfigError(f"study {name!r} in {config.storage} was not made by autometa; "
                              "choose another study name")
        if stored["fingerprint"] != _jsonable(config.fingerprint()):
            diff = _diff(stored["fingerprint"], _jsonable(config.fingerprint()))
            raise ConfigError(
                f"study {name!r} in {config.storage} was run with other settings ({diff}); "
                "use the original settings to resume it, or a new study name"
            )
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
    })
    return study


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
