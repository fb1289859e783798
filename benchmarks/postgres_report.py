"""The report of postgres_workers.py: medians per worker count, the tables, what limits it.

:func:`summarise` takes the medians over repetitions, :func:`interpretation` reads a few
sentences off them, :func:`render` writes the Markdown and :func:`publish` prints the table
and writes the results (also from a JSON read back by ``--report-only``).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from harness import markdown_table, text_table, write_results


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


def publish(result: dict[str, Any], name: str, out: Path) -> dict[str, Any]:
    """Print the table and interpretation and write ``<out>/<name>.json`` and ``.md``."""
    rows = summary_rows(result["summary"])
    print(text_table(SUMMARY_HEADERS, rows))
    print("\n".join(interpretation(result["summary"], result["heartbeat"],
                                   result["environment"]["cores"])))
    for path in write_results(name, result, render(result), out):
        print(f"wrote {path}")
    return result


def render(result: dict[str, Any]) -> str:
    """The Markdown report of a result (``main``'s, or one read back by ``--report-only``)."""
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
