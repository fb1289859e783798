"""Many autometa workers against one real PostgreSQL server: where throughput stops growing.

Each worker is a process running autometa's own claim/heartbeat/tell path with the model
taken out: ``claim()`` a trial against the budget under the storage lock (a PostgreSQL
advisory lock), then inside ``Heartbeat`` suggest three parameters, report once, sleep
``--trial-seconds`` (0: near-instant trials) and ``study.tell``. For each number of worker
processes (``--workers``, default 1, 2, 4, 8) a fresh database and study get a fixed budget
(``--trials``); the runs are interleaved (1, 2, 4, 8, 1, 2, 4, 8, ...) so that a change in the
machine's load hits every size, and the medians of ``--repeats`` runs are reported.

Measured per run:

* **throughput**: finished trials per second from the first claim to the last tell (worker
  start-up, which imports torch, is outside that window);
* **correctness**: exactly ``--trials`` COMPLETE trials and nothing else, and how many distinct
  parameter sets they hold;
* **the lock**: how long each successful ``claim()`` took, and inside it how long the advisory
  lock took to acquire (the queue of workers waiting) and how long it was held (the serial
  section: 1 / held bounds the claims per second of any number of workers);
* **the server**: transactions committed and rolled back, deadlocks (``pg_stat_database``
  deltas of the run's database, workers' start-up and shutdown included), the most client
  connections seen at once (``pg_stat_activity``, polled every 50 ms), heartbeat rows written,
  and the ERROR lines of the server's log (only for the server this script starts).

Then the **heartbeat load**: the largest worker count holds one trial each for
``--heartbeat-seconds`` (0 skips it), and the rows written to ``trial_heartbeats`` per second
are compared with workers / HEARTBEAT (autometa beats every HEARTBEAT = 10 s).

Without ``--url`` a throwaway server is started (``tests/pg_server.py``: fsync and
synchronous_commit off, as in the tests); with ``--url postgresql+psycopg://...`` an existing
server is used: its database must exist, each run gets a fresh study in it, and the monitor
connects to that server's ``postgres`` database (so its polls are not counted).

    python benchmarks/postgres_workers.py        # ~4 min on 2 cores (6 when busy)
    python benchmarks/postgres_workers.py --trials 50 --workers 1,8 --repeats 1 \\
        --heartbeat-seconds 0                    # a quick look, ~40 s

Prints a table and writes benchmarks/results/postgres_workers.json and .md (``--out``);
``--report-only`` rebuilds the summary and the Markdown from that JSON without measuring.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import statistics
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

#: Seconds between two polls of pg_stat_activity (the peak connection count).
POLL_S = 0.05
#: Seconds to wait for the workers' server processes to end, so their statistics are flushed.
SETTLE_S = 20.0
#: The parameters every dummy trial suggests: autometa's first choice plus two of a plugin's.
ALGORITHMS = ["maml", "protonet"]


# --------------------------------------------------------------------------- the worker


def worker_main(url: str, study_name: str, n_trials: int, trial_seconds: float, index: int,
                ready: Any, start: Any, results: Any) -> None:
    """One worker process: autometa's claim/heartbeat/tell loop with no model.

    Reports ``ready`` once everything is imported and connected, waits for ``start`` (so the
    timed window holds no start-up) and puts its measurements on ``results``.
    """
    import warnings

    warnings.filterwarnings("ignore")
    import optuna

    from autometa.engine import storage as storage_module
    from autometa.engine.sampling import trial_sampler
    from autometa.engine.storage import claim, open_storage
    from autometa.engine.worker import Heartbeat

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    lock_wait: list[float] = []
    lock_held: list[float] = []
    lock_cpu: list[float] = []
    real_lock = storage_module.storage_lock

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

    storage_module.storage_lock = timed_lock  # type: ignore[assignment]
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
            with Heartbeat(study, trial):
                algorithm = trial.suggest_categorical("algorithm", ALGORITHMS)
                lr = trial.suggest_float("lr", 1e-4, 1e-1, log=True)
                steps = trial.suggest_int("steps", 1, 10)
                value = lr * steps * (1.0 if algorithm == "maml" else 2.0)
                trial.report(value, 1)
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


# --------------------------------------------------------------------------- the monitor


def conninfo(url: str, dbname: str | None = None) -> str:
    """A libpq URI for psycopg from a SQLAlchemy URL, optionally for another database."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url).set(drivername="postgresql")
    if dbname is not None:
        parsed = parsed.set(database=dbname)
    return parsed.render_as_string(hide_password=False)


class Monitor:
    """Reads the server's statistics from outside the measured database.

    Its connections go to the server's ``postgres`` database when it can reach it, so its
    own transactions (a poll every 50 ms) do not land in the numbers it reads.
    """

    def __init__(self, url: str) -> None:
        import psycopg

        self.url = url
        self.dbname = psycopg.conninfo.conninfo_to_dict(conninfo(url))["dbname"]
        try:
            self.info = conninfo(url, "postgres")
            psycopg.connect(self.info, connect_timeout=10).close()
            self.separate = True
        except psycopg.Error:
            self.info = conninfo(url)
            self.separate = False
            print("warning: the server's postgres database is not reachable; the monitor's "
                  "own polls are counted in the transactions", file=sys.stderr)

    def connect(self, target: bool = False) -> Any:
        """An autocommit connection: to the monitor's database, or to the measured one."""
        import psycopg

        return psycopg.connect(conninfo(self.url) if target else self.info, autocommit=True,
                               connect_timeout=10)

    def clients(self, conn: Any) -> int:
        """Client connections to the measured database, this one excepted."""
        return int(conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = %s "
            "AND backend_type = 'client backend' AND pid <> pg_backend_pid()",
            (self.dbname,)).fetchone()[0])

    def database(self, conn: Any) -> dict[str, int]:
        """The measured database's cumulative counters, read afresh."""
        # Each statement in autocommit is its own snapshot; clearing it says so explicitly.
        conn.execute("SELECT pg_stat_clear_snapshot()")
        commit, rollback, deadlocks = conn.execute(
            "SELECT xact_commit, xact_rollback, deadlocks FROM pg_stat_database "
            "WHERE datname = %s", (self.dbname,)).fetchone()
        return {"commit": int(commit), "rollback": int(rollback), "deadlocks": int(deadlocks)}

    def heartbeats(self) -> dict[str, int]:
        """Rows inserted and updated in ``trial_heartbeats`` (a per-database view)."""
        with self.connect(target=True) as conn:
            row = conn.execute("SELECT n_tup_ins, n_tup_upd FROM pg_stat_user_tables "
                               "WHERE relname = 'trial_heartbeats'").fetchone()
        return {"inserted": int(row[0]), "updated": int(row[1])} if row else \
            {"inserted": 0, "updated": 0}

    def settled(self) -> dict[str, int]:
        """The database's counters once no client is connected and they stopped moving.

        A server process sends its statistics when it ends (or, idle, up to seconds later),
        so the counters are read only after the workers' connections are gone.
        """
        deadline = time.monotonic() + SETTLE_S
        with self.connect() as conn:
            while self.clients(conn) and time.monotonic() < deadline:
                time.sleep(0.05)
            last = self.database(conn)
            while time.monotonic() < deadline:
                time.sleep(0.3)
                now = self.database(conn)
                if now == last:
                    break
                last = now
        return last

    @contextmanager
    def peak_connections(self) -> Iterator[list[int]]:
        """Poll the client connections in a thread; the list holds the peak afterwards."""
        peak = [0]
        stop = threading.Event()

        def poll() -> None:
            with self.connect() as conn:
                while not stop.is_set():
                    peak[0] = max(peak[0], self.clients(conn))
                    stop.wait(POLL_S)

        thread = threading.Thread(target=poll, daemon=True, name="pg-poll")
        thread.start()
        try:
            yield peak
        finally:
            stop.set()
            thread.join()


class ServerLog:
    """The ERROR lines the server logged since `mark` (the script's own server only)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.offset = 0

    def mark(self) -> None:
        if self.path is not None and self.path.exists():
            self.offset = self.path.stat().st_size

    def errors(self) -> list[str] | None:
        if self.path is None:
            return None
        with open(self.path, "rb") as log:
            log.seek(self.offset)
            text = log.read().decode(errors="replace")
        return [line.strip() for line in text.splitlines() if "ERROR:" in line]


# --------------------------------------------------------------------------- one run


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


def run_once(url: str, study_name: str, monitor: Monitor, log: ServerLog, *, workers: int,
             trials: int, trial_seconds: float) -> dict[str, Any]:
    """``workers`` processes spend a budget of ``trials`` in a new study; what it cost."""
    import optuna

    from autometa.engine.storage import open_storage

    storage = open_storage(url)
    optuna.create_study(storage=storage, study_name=study_name, direction="minimize")
    storage.engine.dispose()  # the parent's connections must not idle through the run
    beats_before = monitor.heartbeats()
    before = monitor.settled()
    log.mark()
    load = os.getloadavg()[0]

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
        print(f"FAILURE: {workers} worker(s): {complete} COMPLETE of {trials} "
              f"(states {states}); worker errors: {worker_errors}", flush=True)
    started = [r["first_claim"] for r in reports if "first_claim" in r]
    wall = max(r["last_tell"] for r in reports if "last_tell" in r) - min(started)
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
    from autometa.engine.storage import HEARTBEAT

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


# --------------------------------------------------------------------------- report


def summarise(runs: list[dict[str, Any]], workers: Sequence[int]) -> list[dict[str, Any]]:
    """Per worker count: the medians over the repetitions (and the range of trials/s)."""
    rows = []
    for w in workers:
        mine = [r for r in runs if r["workers"] == w]

        def med(get: Any, mine: list[dict[str, Any]] = mine) -> float:
            return statistics.median(get(r) for r in mine)

        rows.append({
            "workers": w, "runs": len(mine), "ok": all(r["ok"] for r in mine),
            "trials_per_s": med(lambda r: r["trials_per_s"]),
            "trials_per_s_min": min(r["trials_per_s"] for r in mine),
            "trials_per_s_max": max(r["trials_per_s"] for r in mine),
            "claim_ms_median": med(lambda r: r["claim_ms"]["median"]),
            "claim_ms_p95": med(lambda r: r["claim_ms"]["p95"]),
            "lock_wait_ms_median": med(lambda r: r["lock_wait_ms"]["median"]),
            "lock_wait_ms_p95": med(lambda r: r["lock_wait_ms"]["p95"]),
            "lock_held_ms_median": med(lambda r: r["lock_held_ms"]["median"]),
            "lock_held_cpu_ms_median": med(lambda r: r["lock_held_cpu_ms"]["median"]),
            "lock_bound_per_s": med(lambda r: r["lock_bound_per_s"]),
            "lock_busy": med(lambda r: r["lock_busy"]),
            "trial_ms_median": med(lambda r: r["trial_ms"]["median"]),
            "commits_per_trial": med(lambda r: r["commits_per_trial"]),
            "rollbacks": med(lambda r: r["xact_rollback"]),
            "rollbacks_per_worker": med(lambda r: r["xact_rollback"] / r["workers"]),
            "deadlocks": sum(r["deadlocks"] for r in mine),
            "server_errors": None if any(r["server_errors"] is None for r in mine)
            else sum(r["server_errors"] for r in mine),
            "max_connections": max(r["max_connections"] for r in mine),
            "machine_busy": med(lambda r: r["machine_busy"]),
            "workers_cpu": med(lambda r: r["workers_cpu"]),
            "heartbeats_per_trial": med(lambda r: r["heartbeat_writes"] / r["trials"]),
        })
    return rows


def _f(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) \
        else f"{value:.{digits}f}"


def _pct(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.0%}"


SUMMARY_HEADERS = ["workers", "trials/s (range)", "claim ms med / p95",
                   "lock wait ms med / p95", "lock held ms (CPU)", "lock bound /s",
                   "lock busy", "trial ms outside lock", "commits/trial",
                   "rollbacks (per worker)", "deadlocks", "server errors", "max conns",
                   "CPU busy: machine / workers", "all COMPLETE"]


def summary_rows(summary: list[dict[str, Any]]) -> list[list[str]]:
    """The table's cells, shared by the terminal and the Markdown file."""
    return [[str(s["workers"]),
             f"{_f(s['trials_per_s'])} ({_f(s['trials_per_s_min'])}-{_f(s['trials_per_s_max'])})",
             f"{_f(s['claim_ms_median'])} / {_f(s['claim_ms_p95'])}",
             f"{_f(s['lock_wait_ms_median'])} / {_f(s['lock_wait_ms_p95'])}",
             f"{_f(s['lock_held_ms_median'])} ({_f(s['lock_held_cpu_ms_median'])})",
             _f(s["lock_bound_per_s"], 0), _pct(s["lock_busy"]), _f(s["trial_ms_median"]),
             _f(s["commits_per_trial"]),
             f"{_f(s['rollbacks'], 0)} ({_f(s['rollbacks_per_worker'])})", str(s["deadlocks"]),
             "n/a" if s["server_errors"] is None else str(s["server_errors"]),
             str(s["max_connections"]),
             f"{_pct(s['machine_busy'])} / {_pct(s['workers_cpu'])}",
             "yes" if s["ok"] else "**NO**"]
            for s in summary]


def interpretation(summary: list[dict[str, Any]], heartbeat: dict[str, Any] | None,
                   cores: int) -> list[str]:
    """A few sentences read off the numbers (written for any size of run)."""
    one, most = summary[0], summary[-1]
    best = max(summary, key=lambda s: s["trials_per_s"])
    grew = most["lock_held_ms_median"] / one["lock_held_ms_median"]
    cpu_grew = most["lock_held_cpu_ms_median"] / one["lock_held_cpu_ms_median"]
    lines = [
        f"- **Scaling stops at the lock**: {one['workers']} worker(s) finish "
        f"{_f(one['trials_per_s'])} trials/s, the best is {_f(best['trials_per_s'])}/s with "
        f"{best['workers']}, and {most['workers']} finish {_f(most['trials_per_s'])}/s "
        f"({most['trials_per_s'] / one['trials_per_s']:.2f}x one). The claim runs under one "
        "advisory lock for the whole server, so claims are serial: with "
        f"{most['workers']} workers the lock is held {_pct(most['lock_busy'])} of the time and "
        "throughput is its bound, 1 / time held "
        f"(~{_f(most['lock_bound_per_s'], 0)}/s), whatever the number of workers. A lone "
        f"worker already keeps {_pct(one['workers_cpu'])} of the {cores} cores busy (its own "
        f"Python), and with {best['workers']} the machine is {_pct(best['machine_busy'])} "
        "busy: from there, more processes only queue for a core and for the lock, and the "
        "longer the holder waits for a core, the lower the bound.",
        f"- **What the serial section costs**: {_f(one['lock_held_ms_median'])} ms per claim "
        f"alone, {_f(most['lock_held_ms_median'])} ms with {most['workers']} workers "
        f"({grew:.1f}x); it is about 6 ORM sessions (failing dead and stale trials, reading "
        "the trials to count the budget, `ask`), mostly client-side "
        "Python. The holder's own CPU time per claim is "
        + ", ".join(f"{_f(s['lock_held_cpu_ms_median'])} ms with {s['workers']}"
                    for s in summary)
        + f" ({cpu_grew:.1f}x): part of that is more work (Optuna's cache re-reads the other "
        "workers' running trials, and those they finished since, each time the section "
        "reads the trial list; checked separately on a quiet machine, 7 other running trials "
        "take a lone claim from 18 to 32 ms of CPU), part most likely busy cores making "
        "the same Python cost more CPU time (shared caches, a virtual machine's cores), as "
        "it jumps already with 2 workers, where only one other trial runs. On top, wall "
        "time over CPU time "
        f"goes from {one['lock_held_ms_median'] / one['lock_held_cpu_ms_median']:.1f} to "
        f"{most['lock_held_ms_median'] / most['lock_held_cpu_ms_median']:.1f}: the holder "
        f"waiting for the server or a core ({cores} cores {_pct(most['machine_busy'])} busy "
        f"during the {most['workers']}-worker runs). Claims wait "
        f"{_f(most['lock_wait_ms_median'])} ms for the lock (median; p95 "
        f"{_f(most['lock_wait_ms_p95'])} ms) against {_f(one['lock_wait_ms_median'])} ms "
        "alone.",
        f"- **Commits per trial**: {_f(one['commits_per_trial'])} with one worker, "
        f"{_f(most['commits_per_trial'])} with {most['workers']}, workers' start-up "
        "included: every storage call (each suggest, the report, the heartbeat, the tell and "
        "those inside the lock) is its own session, and about half of the commits are "
        "SQLAlchemy's pre-ping (`pool_pre_ping=True` in `open_storage`: each checkout's "
        "`SELECT 1` commits on its own; checked separately, 100 sessions commit 101 "
        "transactions without it and 200 with it); the lock's own connection adds its "
        "pre-ping, lock and unlock statements.",
    ]
    failed = [s for s in summary if s["deadlocks"] or s["server_errors"] or not s["ok"]]
    per_worker = sorted({s["rollbacks_per_worker"] for s in summary})
    lines.append(
        "- **Failed transactions**: "
        + (f"{', '.join(str(s['workers']) for s in failed)} worker(s) saw deadlocks, server "
           "errors or lost trials (see the runs)" if failed else
           "none: no deadlock, no ERROR in the server's log, every budget spent exactly")
        + f"; the rolled-back transactions are a fixed {', '.join(_f(x) for x in per_worker)} "
        "per worker process (its start-up and exit), none per trial.")
    if heartbeat:
        lines.append(
            f"- **Heartbeats**: {heartbeat['workers']} running trials wrote "
            f"{heartbeat['writes']} rows to trial_heartbeats in {heartbeat['span_s']:.0f} s "
            f"({heartbeat['writes_per_s']:.2f}/s; expected {heartbeat['expected_writes']} "
            f"rows, {heartbeat['expected_per_s']:.2f}/s in steady state = workers / "
            f"{heartbeat['heartbeat_interval_s']} s), while the run's "
            "transactions, workers' start-up, claims and tells included, came to "
            f"{heartbeat['transactions_per_s']:.1f}/s: heartbeats are negligible load; each "
            "trial also beats once when it starts, so an instant trial pays one.")
    return lines


def machine(monitor: Monitor) -> dict[str, Any]:
    """Hardware, PostgreSQL and library versions."""
    from harness import environment

    env = environment()
    for dist in ("optuna", "sqlalchemy", "psycopg"):
        try:
            env["versions"][dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            env["versions"][dist] = None
    with monitor.connect() as conn:
        env["postgresql"] = conn.execute("SELECT version()").fetchone()[0]
        env["postgresql_settings"] = dict(conn.execute(
            "SELECT name, setting FROM pg_settings WHERE name IN ('fsync', "
            "'synchronous_commit', 'max_connections', 'shared_buffers')").fetchall())
    return env


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=200, help="budget per run (200)")
    parser.add_argument("--workers", default="1,2,4,8",
                        help="worker process counts, comma-separated (1,2,4,8)")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved repetitions (2)")
    parser.add_argument("--trial-seconds", type=float, default=0.0,
                        help="sleep inside each trial (0: near-instant)")
    parser.add_argument("--heartbeat-seconds", type=float, default=25.0,
                        help="how long each trial is held open for the heartbeat load "
                             "(25; 0 skips it)")
    parser.add_argument("--url", help="an existing server's database (postgresql+psycopg://"
                                      "...); default: start a throwaway server")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--name", default="postgres_workers")
    parser.add_argument("--report-only", action="store_true",
                        help="measure nothing: rebuild the summary and the Markdown from "
                             "<out>/<name>.json")
    args = parser.parse_args(argv)
    workers = [int(w) for w in args.workers.split(",")]
    if args.report_only:
        result = json.loads((args.out / f"{args.name}.json").read_text())
        result["summary"] = summarise(result["runs"], result["settings"]["workers"])
        return publish(result, args.name, args.out)

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    server = None
    if args.url is None:
        sys.path.insert(0, str(REPO / "tests"))
        from pg_server import PostgresServer

        server = PostgresServer().start()
    tag = time.strftime("%H%M%S")
    began = time.perf_counter()
    runs: list[dict[str, Any]] = []
    heartbeat = None
    try:
        def target(label: str) -> tuple[str, Monitor, ServerLog]:
            """A fresh database (own server) or study (--url) for one run."""
            url = server.url(label) if server is not None else args.url
            log = ServerLog(server.base_dir / "server.log" if server is not None and
                            server.base_dir is not None else None)
            return url, Monitor(url), log

        url, monitor, _ = target("pgw_setup")
        env = machine(monitor)
        for repeat in range(args.repeats):
            for w in workers:
                label = f"pgw_{tag}_r{repeat}_w{w}"
                url, monitor, log = target(label)
                run = run_once(url, label, monitor, log, workers=w, trials=args.trials,
                               trial_seconds=args.trial_seconds)
                run["repeat"] = repeat
                runs.append(run)
                print(f"repeat {repeat}, {w} worker(s): {run['trials_per_s']:.1f} trials/s, "
                      f"claim {run['claim_ms']['median']:.1f} ms (p95 "
                      f"{run['claim_ms']['p95']:.1f}), {run['commits_per_trial']:.1f} "
                      f"commits/trial, {run['xact_rollback']} rolled back, "
                      f"{run['max_connections']} connections"
                      + ("" if run["ok"] else "  FAILURE"), flush=True)
                if server is not None:
                    server.drop_database(label)
        if args.heartbeat_seconds > 0:
            label = f"pgw_{tag}_heartbeat"
            url, monitor, log = target(label)
            heartbeat = heartbeat_load(url, label, monitor, log, workers=max(workers),
                                       seconds=args.heartbeat_seconds)
            print(f"heartbeat: {heartbeat['writes']} rows in {heartbeat['span_s']:.1f} s = "
                  f"{heartbeat['writes_per_s']:.2f}/s (expected {heartbeat['expected_writes']}"
                  f", {heartbeat['expected_per_s']:.2f}/s)", flush=True)
    finally:
        if server is not None:
            server.stop()
    runtime = time.perf_counter() - began
    result = {"environment": env,
              "settings": vars(args) | {"out": str(args.out), "workers": workers},
              "runtime_s": runtime, "runs": runs, "summary": summarise(runs, workers),
              "heartbeat": heartbeat}
    return publish(result, args.name, args.out)


def publish(result: dict[str, Any], name: str, out: Path) -> dict[str, Any]:
    """Print the table and interpretation and write ``<out>/<name>.json`` and ``.md``."""
    from harness import text_table, write_results

    rows = summary_rows(result["summary"])
    print(text_table(SUMMARY_HEADERS, rows))
    print("\n".join(interpretation(result["summary"], result["heartbeat"],
                                   result["environment"]["cores"])))
    for path in write_results(name, result, render(result), out):
        print(f"wrote {path}")
    return result


def render(result: dict[str, Any]) -> str:
    """The Markdown report of a result (``main``'s, or one read back by ``--report-only``)."""
    from harness import markdown_table

    env, settings, runs = result["environment"], result["settings"], result["runs"]
    summary, heartbeat = result["summary"], result["heartbeat"]
    lines = [
        "# Many workers against one PostgreSQL server", "",
        f"{settings['trials']} near-instant dummy trials per run (autometa's claim, "
        "Heartbeat, three suggests, one report, tell; sleep "
        f"{settings['trial_seconds']} s), each worker a process, {settings['repeats']} "
        "interleaved repetitions, medians. "
        + ("A throwaway local server (fsync and synchronous_commit off)."
           if settings["url"] is None else "An existing server.")
        + f" {env['cpu']}, {env['cores']} cores, load average {env['load_average_1m']:.2f} "
        f"at start; {env['postgresql'].split(' on ')[0]}; optuna {env['versions']['optuna']}, "
        f"SQLAlchemy {env['versions']['sqlalchemy']}, psycopg {env['versions']['psycopg']}; "
        f"autometa {env['autometa_commit']}; {env['date']}; "
        f"{result['runtime_s'] / 60:.1f} min (`{env['command']}`).", "",
        markdown_table(SUMMARY_HEADERS, summary_rows(summary)), "",
        "*claim*: one successful `claim()` call; *lock wait*: acquiring the advisory lock "
        "inside it (a pooled connection's pre-ping included); *lock held*: the serial section "
        "(failing dead and stale trials, reading the trials to count the budget, `ask`), "
        "wall time and, in brackets, the holding thread's CPU time; *lock bound*: 1 / mean "
        "hold; *lock busy*: share of the run's wall time the lock was held; *trial ms "
        "outside lock*: from the claim's return to the tell's (suggests, heartbeat, report, "
        "tell); *commits, rollbacks*: `pg_stat_database` deltas of the run's database; "
        "*server errors*: ERROR lines in the server's log; *max conns*: client connections "
        "seen at once; *CPU busy*: share of all cores' time during the run used by the whole "
        "machine (the server and other users included) / by the worker processes. The "
        "claim that finds the budget spent (one per worker, after its last tell) is left "
        "out of the lock and claim columns.", "", "## What limits it", "",
        *interpretation(summary, heartbeat, env["cores"]), "", "## Runs", "",
        markdown_table(
            ["workers", "repeat", "trials/s", "wall s", "trials per worker", "claim ms p95",
             "lock wait ms p95", "lock held ms p95", "commits", "rollbacks",
             "distinct params", "CPU busy: machine / workers", "load before"],
            [[r["workers"], r["repeat"], _f(r["trials_per_s"]), _f(r["wall_s"], 2),
              " ".join(map(str, r["trials_per_worker"])), _f(r["claim_ms"]["p95"]),
              _f(r["lock_wait_ms"]["p95"]), _f(r["lock_held_ms"]["p95"]), r["xact_commit"],
              r["xact_rollback"], r["distinct_params"],
              f"{_pct(r['machine_busy'])} / {_pct(r['workers_cpu'])}",
              _f(r["load_average_1m_before"], 2)] for r in runs]),
    ]
    if heartbeat:
        lines += ["", "## Heartbeat load", "",
                  markdown_table(
                      ["running trials", "held s", "rows written", "expected", "rows/s",
                       "expected /s (steady)", "all transactions /s", "max conns"],
                      [[heartbeat["workers"], _f(heartbeat["span_s"]), heartbeat["writes"],
                        heartbeat["expected_writes"], f"{heartbeat['writes_per_s']:.2f}",
                        f"{heartbeat['expected_per_s']:.2f}",
                        f"{heartbeat['transactions_per_s']:.2f}",
                        heartbeat["max_connections"]]])]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
