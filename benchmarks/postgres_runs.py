"""One measured run of postgres_workers.py, and the heartbeat load.

:func:`run_once` starts worker processes (postgres_worker_loop.py), lets them spend a budget
of trials in a fresh study, and gathers what it cost: throughput, claim and lock times, the
server's transactions, connections and errors, the machine's CPU. :func:`heartbeat_load`
holds one trial per worker open to count the heartbeat rows written.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from harness import load_average
from postgres_monitor import Monitor, ServerLog
from postgres_worker_loop import worker_main


def quantiles(values: Sequence[float], scale: float = 1e3) -> dict[str, float]:
    """Median, 95th percentile and maximum of ``values`` times ``scale`` (s to ms)."""
    if not values:
        return {"median": math.nan, "p95": math.nan, "max": math.nan}
    ordered = sorted(v * scale for v in values)
    p95 = ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)]
    return {"median": statistics.median(ordered), "p95": p95, "max": ordered[-1]}


def cpu_ticks() -> tuple[int, int]:
    """The machine's busy and total CPU ticks so far, all cores and all users (Linux)."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 0, 0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    # guest time is already counted in user time: the first 8 fields are the whole
    return sum(fields[:8]) - idle, sum(fields[:8])


def _get(queue: Any, processes: Sequence[Any]) -> Any:
    """The next item of ``queue``; raises if a worker died without sending one."""
    import queue as queues

    while True:
        try:
            return queue.get(timeout=1.0)
        except queues.Empty:
            dead = [p.exitcode for p in processes if p.exitcode not in (None, 0)]
            if dead:
                raise RuntimeError(f"a worker process died (exit codes {dead})") from None


def target(server: Any, url: str | None, label: str) -> tuple[str, Monitor, ServerLog]:
    """A fresh database ``label`` on ``server`` (the script's own), else the existing
    server's ``url`` (a fresh study in it); its monitor and server log."""
    url = server.url(label) if server is not None else url
    log = ServerLog(server.base_dir / "server.log" if server is not None and
                    server.base_dir is not None else None)
    return url, Monitor(url), log


def outcome(url: str, study_name: str, trials: int, reports: Sequence[dict[str, Any]],
            label: str) -> tuple[list[Any], dict[str, int], int, list[str], bool, float]:
    """What a run left: its trials, their states, the COMPLETE count, the workers' errors,
    whether exactly ``trials`` COMPLETE trials and nothing else, and the timed window (s)."""
    import optuna

    from autometa.study.storage import open_storage

    storage = open_storage(url, create_tables=False)
    done = optuna.load_study(study_name=study_name, storage=storage).get_trials(deepcopy=False)
    storage.engine.dispose()
    states: dict[str, int] = {}
    for t in done:
        states[t.state.name] = states.get(t.state.name, 0) + 1
    complete = states.get("COMPLETE", 0)
    worker_errors = [r["error"] for r in reports if r["error"]]
    ok = complete == trials == len(done) and not worker_errors
    if not ok:
        print(f"FAILURE: {label}: {complete} COMPLETE of {trials} (states {states}); worker "
              f"errors: {worker_errors[:5]}", flush=True)
    started = [r["first_claim"] for r in reports if "first_claim" in r]
    wall = max(r["last_tell"] for r in reports if "last_tell" in r) - min(started)
    return done, states, complete, worker_errors, ok, wall


def run_once(url: str, study_name: str, monitor: Monitor, log: ServerLog, *, workers: int,
             trials: int, trial_seconds: float) -> dict[str, Any]:
    """``workers`` processes spend a budget of ``trials`` in a new study; what it cost."""
    import optuna

    from autometa.study.storage import open_storage

    storage = open_storage(url)
    optuna.create_study(storage=storage, study_name=study_name, direction="minimize")
    storage.engine.dispose()  # the parent's connections must not idle through the run
    beats_before = monitor.heartbeats()
    before = monitor.settled()
    log.mark()
    load = load_average()

    context = multiprocessing.get_context("spawn")  # autometa's pool starts workers so too
    ready, results, start = context.Queue(), context.Queue(), context.Event()
    processes = [context.Process(target=worker_main, daemon=True,
                                 args=(url, study_name, trials, trial_seconds, i, ready, start,
                                       results)) for i in range(workers)]
    with monitor.peak_connections() as peak:
        for process in processes:
            process.start()
        for _ in processes:
            _get(ready, processes)
        ticks = cpu_ticks()
        start.set()
        reports = [_get(results, processes) for _ in processes]
        ticks = tuple(b - a for a, b in zip(ticks, cpu_ticks(), strict=True))
        for process in processes:
            process.join(timeout=60)
    after = monitor.settled()
    beats_after = monitor.heartbeats()
    errors = log.errors()

    done, states, complete, worker_errors, ok, wall = outcome(
        url, study_name, trials, reports, f"{workers} worker(s)")
    commits = after["commit"] - before["commit"]
    rollbacks = after["rollback"] - before["rollback"]
    claims = [s for r in reports for s in r["claim_s"]]
    held = [s for r in reports for s in r.get("lock_held_s", [])]
    cores = os.cpu_count() or 1
    writes = sum(beats_after[k] - beats_before[k] for k in beats_after)
    return {
        "workers": workers, "trials": trials, "trial_seconds": trial_seconds,
        "complete": complete, "states": states, "ok": ok, "worker_errors": worker_errors,
        "distinct_params": len({tuple(sorted(t.params.items())) for t in done}),
        "wall_s": wall, "trials_per_s": complete / wall if wall > 0 else math.nan,
        "trials_per_worker": sorted(r["trials"] for r in reports),
        "claim_ms": quantiles(claims),
        "lock_wait_ms": quantiles([s for r in reports for s in r.get("lock_wait_s", [])]),
        "lock_held_ms": quantiles(held),
        "lock_held_cpu_ms": quantiles([s for r in reports for s in r.get("lock_cpu_s", [])]),
        "trial_ms": quantiles([s for r in reports for s in r["trial_s"]]),
        # The serial section: no number of workers claims faster than one per hold.
        "lock_bound_per_s": 1 / statistics.mean(held) if held else math.nan,
        "lock_busy": sum(held) / wall if wall > 0 else math.nan,
        "xact_commit": commits, "xact_rollback": rollbacks,
        "deadlocks": after["deadlocks"] - before["deadlocks"],
        "commits_per_trial": commits / trials, "rollbacks_per_trial": rollbacks / trials,
        "heartbeat_writes": writes, "max_connections": peak[0],
        "server_errors": None if errors is None else len(errors),
        "server_error_samples": None if errors is None else errors[:5],
        # Shares of all cores' time in the window: the whole machine (the server, other
        # users' work) and this run's worker processes alone.
        "machine_busy": ticks[0] / ticks[1] if ticks[1] else math.nan,
        "workers_cpu": sum(r.get("cpu_s", 0.0) for r in reports) / (wall * cores)
        if wall > 0 else math.nan,
        "final_claims": [r.get("final_claim") for r in reports],
        "load_average_1m_before": load,
    }


def heartbeat_load(url: str, study_name: str, monitor: Monitor, log: ServerLog, *,
                   workers: int, seconds: float) -> dict[str, Any]:
    """``workers`` trials held open ``seconds`` each: heartbeat rows written per second."""
    from autometa.study.storage import HEARTBEAT

    run = run_once(url, study_name, monitor, log, workers=workers, trials=workers,
                   trial_seconds=seconds)
    # A trial beats when it starts and then every HEARTBEAT s while it runs.
    expected_writes = workers * (1 + math.floor(seconds / HEARTBEAT))
    return {
        "workers": workers, "hold_s": seconds, "span_s": run["wall_s"], "ok": run["ok"],
        "heartbeat_interval_s": HEARTBEAT, "writes": run["heartbeat_writes"],
        "expected_writes": expected_writes,
        "writes_per_s": run["heartbeat_writes"] / run["wall_s"],
        "expected_per_s": workers / HEARTBEAT,
        "transactions_per_s": (run["xact_commit"] + run["xact_rollback"]) / run["wall_s"],
        "xact_commit": run["xact_commit"], "xact_rollback": run["xact_rollback"],
        "max_connections": run["max_connections"], "server_errors": run["server_errors"],
    }
