"""The budget and the trials that use it: a worker claims each trial under the storage's
lock, so that any number of workers and processes end with exactly ``n_trials``; trials
whose process died (found by its pid on this machine, by its heartbeat elsewhere) are
failed and queued again with their parameters."""

from __future__ import annotations

import logging
import os
import socket
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import optuna
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.trial import FrozenTrial, TrialState

from autometa.engine.completion import queue_completions
from autometa.engine.lock import storage_lock
from autometa.study.baselines import is_baseline
from autometa.study.completion import is_completion
from autometa.study.storage import GRACE, retry_callback

log = logging.getLogger(__name__)


def heartbeat_storage(study: optuna.Study) -> BaseHeartbeat | None:
    """The study's storage if it records trials' heartbeats (an RDB storage opened with a
    heartbeat interval, see :func:`open_storage`), else None."""
    storage = study._storage  # the study's own storage: Optuna offers no other handle
    if isinstance(storage, BaseHeartbeat) and storage.get_heartbeat_interval():
        return storage
    return None


def outside_budget(trial: FrozenTrial) -> bool:
    """Baseline and completion trials (:mod:`autometa.study.baselines`,
    :mod:`autometa.study.completion`): ``n_trials`` counts the other searched trials."""
    return is_baseline(trial) or is_completion(trial)


def counts(trial: FrozenTrial) -> bool:
    """Trials that use up budget: finished ones, except crashed trials that are retried
    and trials :func:`outside_budget`."""
    if outside_budget(trial):
        return False
    if trial.state in (TrialState.COMPLETE, TrialState.PRUNED):
        return True
    return trial.state == TrialState.FAIL and "failure" in trial.user_attrs


def budget_used(study: optuna.Study) -> int:
    """Trials that count against ``n_trials``: finished ones (see :func:`counts`) and running
    ones (each will finish, or be found dead and retried)."""
    return sum(1 for t in study.get_trials(deepcopy=False) if uses_budget(t))


def uses_budget(trial: FrozenTrial) -> bool:
    """:func:`counts`, or a searched trial running."""
    return counts(trial) or (trial.state == TrialState.RUNNING and not outside_budget(trial))


#: Trial user attribute naming the process running it: {"host", "pid", "device", "worker"}.
WORKER_ATTR = "worker"


def claim(study: optuna.Study, url: str, n_trials: int | None, deadline: float | None,
          worker: Mapping[str, Any],
          sampler_for: Callable[[int], optuna.samplers.BaseSampler],
          complete: Sequence[str] = ()) -> optuna.Trial | None:
    """A new trial for this process, or None when the budget or the time is spent.

    Under :func:`storage_lock`: dead local trials are failed and queued again first; then
    the trials that count (:func:`budget_used`) are compared with ``n_trials``, so any
    number of workers and processes end with exactly ``n_trials`` finished. A queued
    trial (Optuna's WAITING trial: a baseline, an initial configuration, a retry) is taken
    before a new one is sampled; a queued baseline or completion trial is taken even once
    the budget is spent (it uses none).

    Args:
        sampler_for: the sampler for the trial of a given number (seeded by it, so that
            no two trials share a random stream).
        complete: the searched algorithms that must each end with a fully trained trial
            (empty when nothing prunes): once the budget is claimed and no budgeted trial
            runs, the best pruned configuration of each one lacking it is queued
            (:mod:`autometa.engine.completion`).
    """
    if deadline is not None and time.time() >= deadline:
        return None
    # The serial section of a search (its cost bounds claims per second on one storage:
    # benchmarks/postgres_workers.py), so it reads the trials once.
    with storage_lock(url):
        fail_dead_trials(study)
        trials = study.get_trials(deepcopy=False)
        used = sum(1 for t in trials if uses_budget(t))
        # ask() takes the first queued (WAITING) trial, else creates trial len(trials).
        queued = [t for t in trials if t.state == TrialState.WAITING]
        spent = n_trials is not None and used >= n_trials
        if spent and complete and not any(t.state == TrialState.RUNNING and uses_budget(t)
                                          for t in trials) \
                and queue_completions(study, trials, complete):
            trials = study.get_trials(deepcopy=False)
            queued = [t for t in trials if t.state == TrialState.WAITING]
        if spent:  # only a trial outside the budget may still run
            queued = [t for t in queued if outside_budget(t)]
            if not queued:
                return None
        study.sampler = sampler_for(queued[0].number if queued else len(trials))
        with warnings.catch_warnings():  # the worker runs Optuna's heartbeat thread itself
            warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed")
            trial = _take(study, queued[0]) if spent else study.ask()
        # A first heartbeat at once: a process that dies before its heartbeat thread starts
        # must still be found stale (Optuna finds only trials with a beat older than GRACE).
        beat = heartbeat_storage(study)
        if beat is not None:
            beat.record_heartbeat(trial._trial_id)
    # Outside the lock: until it is set, no process fails this trial as dead by its pid
    # (it has none to check yet; its heartbeat is fresh).
    trial.set_user_attr(WORKER_ATTR, {"host": socket.gethostname(), "pid": os.getpid(),
                                      **worker})
    if trial.user_attrs.get("crash"):  # a retry inherits its failed trial's attributes
        trial.set_user_attr("crash", None)
    return trial


def _take(study: optuna.Study, queued: FrozenTrial) -> optuna.Trial:
    """Queued trial ``queued`` itself, as ``study.ask()`` takes the first queued trial:
    once the budget is spent, a trial it left queued (an initial configuration beyond
    ``n_trials``) must not run ahead of a baseline or completion trial. Under the lock,
    so no other process takes it meanwhile."""
    storage = study._storage  # Optuna's ask() pops the oldest; it offers no other handle
    if not storage.set_trial_state_values(queued._trial_id, state=TrialState.RUNNING):
        raise RuntimeError(f"queued trial {queued.number} was taken by another process "
                           "under the storage lock")
    return optuna.Trial(study, queued._trial_id)


def fail_dead_trials(study: optuna.Study) -> list[int]:
    """Fail the RUNNING trials whose process is gone and queue each again (twice at most).

    A process on this machine is checked directly (its pid); one elsewhere by its
    heartbeat (RDB storages, after :data:`GRACE` seconds). Returns the numbers failed here.
    """
    host = socket.gethostname()
    failed = []
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    # Optuna's own query for trials whose heartbeat is older than GRACE (what its
    # fail_stale_trials uses), so that each is failed here with a reason.
    beat = heartbeat_storage(study)
    stale = set(beat._get_stale_trial_ids(study._study_id)) if beat is not None else set()
    for t in running:
        who = t.user_attrs.get(WORKER_ATTR) or {}
        if who.get("host") == host and isinstance(who.get("pid"), int) \
                and not _alive(who["pid"]):
            fail_trial(study, t, f"its process {who['pid']} died")
            failed.append(t.number)
        elif t._trial_id in stale:
            fail_trial(study, t, f"no heartbeat for {GRACE} s from {who.get('host', '?')} "
                                 f"(process {who.get('pid', '?')}): its machine or process "
                                 "was lost")
            failed.append(t.number)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    return failed


def fail_running(study: optuna.Study, url: str, number: int, reason: str) -> None:
    """:func:`fail_trial` for trial ``number`` if it is still RUNNING (under the lock)."""
    with storage_lock(url):
        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if trial.number == number:
                fail_trial(study, trial, reason)


def fail_trial(study: optuna.Study, trial: FrozenTrial, reason: str) -> None:
    """Mark a RUNNING ``trial`` FAIL (not counted against the budget) and queue it again."""
    storage = study._storage  # the study's own storage object: Optuna offers no other handle
    try:
        storage.set_trial_user_attr(trial._trial_id, "crash", reason)
        if not storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL):
            return
    except optuna.exceptions.UpdateFinishedTrialError:
        return  # another process got there first
    level = logging.INFO if reason.startswith("interrupted") else logging.WARNING
    log.log(level, "trial %d failed: %s; it will run again", trial.number, reason)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry_callback()(study, storage.get_trial(trial._trial_id))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
