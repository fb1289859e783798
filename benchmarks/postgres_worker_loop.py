"""The worker process of postgres_workers.py: autometa's claim/heartbeat/tell loop, no model.

``claim()`` a trial against the budget under the storage lock (a PostgreSQL advisory lock),
then inside ``Heartbeat`` suggest three parameters, report once, sleep ``trial_seconds`` and
``study.tell``; the lock is timed from inside (waiting for it, holding it, the holder's CPU).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

#: The parameters every dummy trial suggests: autometa's first choice plus two of a plugin's.
ALGORITHMS = ["maml", "protonet"]


def dummy_trial(trial: Any) -> float:
    """A trial without a model: three suggests and one report; its value."""
    algorithm = trial.suggest_categorical("algorithm", ALGORITHMS)
    lr = trial.suggest_float("lr", 1e-4, 1e-1, log=True)
    steps = trial.suggest_int("steps", 1, 10)
    value = lr * steps * (1.0 if algorithm == "maml" else 2.0)
    trial.report(value, 1)
    return value


def worker_main(url: str, study_name: str, n_trials: int, trial_seconds: float, index: int,
                ready: Any, start: Any, results: Any) -> None:
    """One worker process: autometa's claim/heartbeat/tell loop with no model.

    Reports ``ready`` once everything is imported and connected, waits for ``start`` (so the
    timed window holds no start-up) and puts its measurements on ``results``.
    """
    import warnings

    warnings.filterwarnings("ignore")
    import optuna

    from autometa.engine import claim as claim_module
    from autometa.engine.claim import claim
    from autometa.engine.heartbeat import Heartbeat
    from autometa.engine.sampling import trial_sampler
    from autometa.study.storage import open_storage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    lock_wait: list[float] = []
    lock_held: list[float] = []
    lock_cpu: list[float] = []
    real_lock = claim_module.storage_lock

    @contextmanager
    def timed_lock(lock_url: str) -> Iterator[None]:
        # claim() looks storage_lock up in its module at each call: wrapping it there times
        # the acquisition (queueing behind other workers) and the serial section apart.
        asked = time.perf_counter()
        with real_lock(lock_url):
            got, cpu = time.perf_counter(), time.thread_time()
            lock_wait.append(got - asked)
            try:
                yield
            finally:
                lock_held.append(time.perf_counter() - got)
                # This thread's own CPU time in the section: if the wall time held grows
                # and this does not, the holder was waiting for a core, not working.
                lock_cpu.append(time.thread_time() - cpu)

    claim_module.storage_lock = timed_lock  # type: ignore[assignment]
    report: dict[str, Any] = {"index": index, "trials": 0, "claim_s": [], "trial_s": [],
                              "error": None}
    try:
        study = optuna.load_study(study_name=study_name, storage=open_storage(url))
        study.get_trials(deepcopy=False)
        with real_lock(url):  # the lock's own connection, as after a worker's first claim
            pass
    except Exception as exc:  # reported, so the parent does not wait for a worker forever
        report["error"] = f"start-up: {type(exc).__name__}: {exc}"
        ready.put(index)
        results.put(report)
        return
    ready.put(index)
    start.wait()
    report["first_claim"] = time.time()
    report["last_tell"] = report["first_claim"]
    cpu = time.process_time()
    try:
        while True:
            asked = time.perf_counter()
            trial = claim(study, url, n_trials, None, {"device": "cpu", "worker": index},
                          lambda number: trial_sampler(0, number))
            if trial is None:
                # The claim that finds the budget spent comes after this worker's last
                # tell, outside the timed window: kept apart from the others.
                report["final_claim"] = {"claim_s": time.perf_counter() - asked,
                                         "wait_s": lock_wait.pop(), "held_s": lock_held.pop(),
                                         "cpu_s": lock_cpu.pop()}
                break
            claimed = time.perf_counter()
            report["claim_s"].append(claimed - asked)
            with Heartbeat(study, trial, url):
                value = dummy_trial(trial)
                if trial_seconds:
                    time.sleep(trial_seconds)
            study.tell(trial, value)
            report["trial_s"].append(time.perf_counter() - claimed)
            report["last_tell"] = time.time()
            report["cpu_s"] = time.process_time() - cpu
            report["trials"] += 1
    except Exception as exc:  # a failed transaction reaching the worker: what we look for
        report["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    report["lock_wait_s"], report["lock_held_s"] = lock_wait, lock_held
    report["lock_cpu_s"] = lock_cpu
    results.put(report)
