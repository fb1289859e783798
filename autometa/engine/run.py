"""Running a search: open or resume the study, run trials until the budget is spent, rank
them on the leaderboard. ``search`` and ``run_search`` are autometa's Python entry points."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.trial import FrozenTrial, TrialState

from autometa.config import SearchConfig
from autometa.engine.prepare import prepare
from autometa.engine.sampling import pruner, sampler
from autometa.engine.storage import CONFIG_ATTR, counts, open_study
from autometa.errors import one_line, redact
from autometa.leaderboard import Leaderboard, compute_leaderboard
from autometa.plugins import PluginHost, create_host
from autometa.progress import NullProgress, Progress
from autometa.space import suggest
from autometa.trial import Diverged, TrialPlan, build, meta_train, save_state, trial_seed

log = logging.getLogger(__name__)


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
    study = open_study(prepared, sampler(config.seed), pruner(config.pruner))
    ready()
    progress = progress or NullProgress()
    artifacts = Path(study.user_attrs[CONFIG_ATTR]["artifacts_path"])

    done = sum(1 for t in study.trials if counts(t))
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


def _best(study: optuna.Study) -> float | None:
    values = [t.value for t in study.trials if t.state == TrialState.COMPLETE]
    if not values:
        return None
    assert all(v is not None for v in values)
    return min(values) if study.direction.name == "MINIMIZE" else max(values)  # type: ignore


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
