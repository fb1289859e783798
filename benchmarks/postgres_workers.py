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

Its parts: postgres_worker_loop.py (the worker process), postgres_monitor.py (the server's
statistics and log), postgres_runs.py (one run, the heartbeat load) and postgres_report.py
(the summary, the tables and what limits throughput); harness.py the shared helpers.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from harness import environment  # noqa: E402
from postgres_monitor import Monitor  # noqa: E402
from postgres_report import publish, summarise  # noqa: E402
from postgres_runs import heartbeat_load, run_once, target  # noqa: E402


def machine(monitor: Monitor) -> dict[str, Any]:
    """Hardware, PostgreSQL and library versions."""
    env = environment(extra_versions=("optuna", "sqlalchemy", "psycopg"))
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
        url, monitor, _ = target(server, args.url, "pgw_setup")
        env = machine(monitor)
        for repeat in range(args.repeats):
            for w in workers:
                label = f"pgw_{tag}_r{repeat}_w{w}"
                url, monitor, log = target(server, args.url, label)
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
            url, monitor, log = target(server, args.url, label)
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


if __name__ == "__main__":
    main()
