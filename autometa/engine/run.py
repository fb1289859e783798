"""Running a search: open or resume the study, run trials until the budget is spent, rank
them on the leaderboard. ``search`` and ``run_search`` are autometa's Python entry points."""

from __future__ import annotations

import logging
import multiprocessing
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.trial import TrialState

from autometa import work
from autometa.config import SearchConfig
from autometa.engine.claim import counts, fail_dead_trials, outside_budget
from autometa.engine.completion import to_complete
from autometa.engine.lock import storage_lock
from autometa.engine.outage import stop_search
from autometa.engine.pool import Pool
from autometa.engine.prepare import Prepared, prepare
from autometa.engine.sampling import strategy
from autometa.engine.storage import open_study
from autometa.engine.worker import Event, WorkerSpec, run_worker
from autometa.errors import ConfigError
from autometa.events import SearchFailed, SearchFinished, SearchStarted
from autometa.leaderboard import Leaderboard, compute_leaderboard
from autometa.plugins import PluginHost, create_host
from autometa.progress import NullProgress, Progress
from autometa.study.artifacts import check_shared
from autometa.study.baselines import is_baseline
from autometa.study.settings import stored_search
from autometa.study.urls import local_file
from autometa.threads import wait_policy_note

log = logging.getLogger(__name__)
_NOTED: list[str] = []  # the wait-policy warning, said once per process


def run_search(
    config: SearchConfig,
    *,
    host: PluginHost | None = None,
    progress: Progress | None = None,
    ready: Callable[[], None] = lambda: None,
    expected_inputs: dict[str, Any] | None = None,
    out: str | Path | None = None,
) -> Leaderboard:
    """Run (or resume) the search described by ``config`` and return its leaderboard.

    Args:
        out: the folder reports go to (``autometa run --out``), given to plugins' hooks
            as ``event.out``.
        ready: called once every input is checked and the study is open, before the first
            trial (the CLI then lets held log lines through).
        expected_inputs: the input files' hashes of the study this process joins (see
            :func:`join_search`).

    Raises:
        ConfigError, DataError, PluginError: a bad input, before anything is stored.
    """
    if getattr(multiprocessing.current_process(), "_inheriting", False):
        # A pool's worker process importing a script that calls this without the
        # `if __name__ == "__main__":` guard: leave quietly (no second search, no traceback
        # per worker); the supervisor then reports the missing guard in one error.
        raise SystemExit(1)
    host = host or create_host()
    threads = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    note = wait_policy_note(torch.get_num_threads())
    if note is not None and not _NOTED:
        _NOTED.append(note)
        log.warning(note)
    try:
        return _run(config, host, progress, ready, expected_inputs,
                    None if out is None else Path(out))
    except Exception as exc:  # a read-only or full storage met outside a trial: one line
        stop_search(exc, config.storage, config.artifacts)
        raise
    finally:
        torch.set_num_threads(threads)


def _run(config: SearchConfig, host: PluginHost, progress: Progress | None,
         ready: Callable[[], None], expected_inputs: dict[str, Any] | None,
         out: Path | None) -> Leaderboard:
    try:  # a dataset's store built while the task is (autometa.work): the display shows it
        with work.reporting(progress.work if progress is not None else None):
            prepared = prepare(config, host, expected_inputs)
    finally:
        if progress is not None:
            progress.work_ended()
    config = prepared.config
    if len(worker_specs(config)) > 1 and local_file(config.storage) is None \
            and config.storage.startswith("sqlite"):
        raise ConfigError("workers > 1 need a storage that several processes share (a SQLite "
                          "file, a journal file or a database server), not an in-memory one")
    study = open_study(prepared, *strategy(config, host, prepared.task.metric.direction))
    try:
        return _trials_and_leaderboard(prepared, study, progress, ready, out)
    except BaseException as exc:
        host.notify("search_failed", SearchFailed(study.study_name, error=exc, out=out),
                    config.plugins)
        raise


def _trials_and_leaderboard(prepared: Prepared, study: optuna.Study,
                            progress: Progress | None, ready: Callable[[], None],
                            out: Path | None) -> Leaderboard:
    config, host = prepared.config, prepared.host
    with storage_lock(config.storage):
        fail_dead_trials(study)  # a crashed run's trials, even when the budget is spent
    ready()
    progress = progress or NullProgress()
    specs = worker_specs(config, out)
    done = sum(1 for t in study.trials if counts(t))
    remaining = None if config.n_trials is None else max(config.n_trials - done, 0)
    # Baselines and completion trials still queued run besides the budget: the display
    # counts them too; so do the completions a spent budget still owes (a resume).
    trials = study.get_trials(deepcopy=False)
    baselines = sum(1 for t in trials if t.state == TrialState.WAITING and outside_budget(t))
    if remaining == 0 and config.pruner != "none":
        baselines += len(to_complete(trials, list(prepared.algorithms),
                                     prepared.task.metric.direction))
    host.notify("search_started", SearchStarted(study.study_name, config=config,
                                                remaining=remaining, out=out),
                config.plugins, study_name=study.study_name, config=config)

    def send(event: Event) -> None:
        name, args = event
        if name != "claimed":
            getattr(progress, name)(*args)

    with progress:
        progress.search_started(None if remaining is None else remaining + baselines, done,
                                config.timeout, prepared.task.metric.name,
                                prepared.task.metric.direction, len(specs), _costs(trials),
                                trial_timeout=config.trial_timeout)
        if remaining != 0 or baselines:
            if len(specs) == 1:  # in this process: no start-up cost, same trials as ever
                run_worker(specs[0], send, prepared=prepared)
            else:
                Pool(study, config.storage, specs, send).run()
        running = sum(1 for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))
    # While other processes still run trials of this study, the leaderboard is a snapshot:
    # nothing is cached in the storage, and the last process to finish writes the reports.
    leaderboard = compute_leaderboard(study, prepared.task, host, top_k=config.top_k,
                                      artifacts=config.artifacts, root=prepared.root,
                                      cache=not running, phase=progress.phase)
    leaderboard.writes_reports = not running and _first_to_report(study, config.storage,
                                                                      config.top_k)
    host.notify("search_finished", SearchFinished(study.study_name, leaderboard=leaderboard,
                                                  out=out),
                config.plugins, study_name=study.study_name, leaderboard=leaderboard)
    return leaderboard


def _costs(trials: list[optuna.trial.FrozenTrial]) -> list[float]:
    """Wall seconds of the finished searched trials (complete, pruned, failed in their own
    code; not those interrupted or lost, nor baselines: seconds each, run first), from
    which a resumed search's ETA starts."""
    finished = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    return [t.duration.total_seconds() for t in trials
            if t.state in finished and t.duration is not None and not is_baseline(t)
            and (t.state != TrialState.FAIL or "failure" in t.user_attrs)]


#: Study user attribute: how many trials had finished when the reports were last written,
#: and for which ``top_k``.
REPORTED_ATTR = "autometa.reported"


def _first_to_report(study: optuna.Study, url: str, top_k: int) -> bool:
    """True for one process only among those that end a search at the same state (the
    same finished trials, the same ``top_k``: a re-run asking for more writes them again)."""
    with storage_lock(url):
        finished = len(study.get_trials(deepcopy=False, states=(
            TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)))
        if study.user_attrs.get(REPORTED_ATTR) in (finished, [finished, top_k]):
            return False
        study.set_user_attr(REPORTED_ATTR, [finished, top_k])
        return True


def join_search(study_name: str, storage: str, *, host: PluginHost | None = None,
                progress: Progress | None = None, ready: Callable[[], None] = lambda: None,
                out: str | Path | None = None, **machine: Any) -> Leaderboard:
    """Join a stored study from this machine and run its trials until its budget is spent
    (``autometa worker``): the search's settings come from the storage, this machine's
    own from ``machine``: ``storage`` (this URL), ``artifacts``, ``data_root``, ``device``,
    ``devices``, ``workers``, ``threads``, ``timeout`` (the others are the study's).

    Every input file must match the hash the study stored (same data on every machine),
    and the artifact store must be the one the other workers write to.

    Raises:
        ConfigError: no such study, a machine setting that cannot be used here, an input
            file that differs or is missing, or an artifact store that is not the
            study's shared one (each named); before anything runs.
    """
    config, inputs, study = stored_search(study_name, storage, **machine)
    check_shared(study, config.artifacts, given=machine.get("artifacts") is not None)
    return run_search(config, host=host, progress=progress, ready=ready, expected_inputs=inputs,
                      out=out)


def create_search(config: SearchConfig, *, host: PluginHost | None = None,
                  store: bool = True) -> int | None:
    """Check every input of ``config`` and create (or finish, or find) its study without
    running a trial: what ``autometa launch`` does before workers join it elsewhere.

    Args:
        store: ``False`` checks only (``--dry-run``): nothing is stored.

    Returns:
        The trials workers still have to run: the budget's remaining ones, queued
        baselines and initial trials, and (a spent budget) the completions a pruner owes;
        ``None`` for a dry run or a search without a trial budget (only a timeout).

    Raises:
        ConfigError, DataError, PluginError: a bad input, before anything is stored.
    """
    host = host or create_host()
    prepared = prepare(config, host)
    if not store:
        return None
    try:
        study = open_study(prepared, *strategy(prepared.config, host,
                                               prepared.task.metric.direction))
    except Exception as exc:  # a read-only or full storage: one line
        stop_search(exc, config.storage, config.artifacts)
        raise
    if config.n_trials is None:
        return None
    trials = study.get_trials(deepcopy=False)
    remaining = max(config.n_trials - sum(1 for t in trials if counts(t)), 0)
    queued = sum(1 for t in trials if t.state == TrialState.WAITING and outside_budget(t))
    owed = 0
    if remaining == 0 and config.pruner != "none":
        owed = len(to_complete(trials, list(prepared.algorithms),
                               prepared.task.metric.direction))
    return remaining + queued + owed


def worker_specs(config: SearchConfig, out: Path | None = None) -> list[WorkerSpec]:
    """One spec per worker: the devices in turn, one deadline for all.

    On a CPU each worker gets ``cores // workers`` torch threads unless ``threads`` is set.
    """
    workers = config.workers or len(config.devices)
    deadline = None if config.timeout is None else time.time() + config.timeout
    cores = os.cpu_count() or 1
    threads = config.threads or (max(1, cores // workers) if workers > 1 else None)
    return [WorkerSpec(config=config.to_dict(), device=config.devices[i % len(config.devices)],
                       index=i, threads=threads, deadline=deadline,
                       out=None if out is None else str(out))
            for i in range(workers)]


def search(task: str, **settings: Any) -> Leaderboard:
    """Run an autometa search from Python and return its leaderboard.

    Args:
        task: task plugin name, e.g. ``"sinusoid"``.
        **settings: any :class:`SearchConfig` field (``algorithms``, ``sources``,
            ``n_trials``, ``seed``, ``meta_steps``, ``trial_timeout``, ``storage``,
            ``plugins``, ...), plus
            ``host`` (a :class:`PluginHost`, default: the installed plugins),
            ``progress`` (progress bars on stderr: by default when stderr is a terminal
            or in a notebook; False: none; True: always; or a
            :class:`~autometa.progress.Progress`) and ``out`` (the report folder
            plugins' hooks are told, ``event.out``).

    Example:
        >>> board = autometa.search("sinusoid", algorithms=["maml", "finetune"],
        ...                         sources=["mlp"], n_trials=10, seed=0)
        >>> board.frame.head()
    """
    host = settings.pop("host", None)
    show = settings.pop("progress", None)
    out = settings.pop("out", None)
    config = SearchConfig.from_dict({"task": task, **settings}, where="search()")
    if isinstance(show, Progress):
        return run_search(config, host=host, progress=show, out=out)
    if show is None:
        show = _watched()
    if show:
        from autometa.progress import RichProgress

        return run_search(config, host=host, progress=RichProgress(), out=out)
    return run_search(config, host=host, out=out)


def _watched() -> bool:
    """Whether someone watches: stderr is a terminal, or this runs in a notebook (rich
    tells both; ``FORCE_COLOR`` or ``TTY_COMPATIBLE=1`` force a terminal, ``TTY_COMPATIBLE=0``
    rules it out)."""
    from rich.console import Console

    console = Console(stderr=True)
    return bool(console.is_terminal or console.is_jupyter)
