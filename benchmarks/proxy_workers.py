"""Many simulated workers on one PostgreSQL server, directly and through the storage proxy.

The same dummy trials as postgres_workers.py (autometa's claim under the storage lock,
``Heartbeat``, three suggests, one report, ``tell``; no model), with 8, 32 and 128
simulated workers (``--workers``), each one thread holding its own storage client
(proxy_worker_loop.py), spread over ``--processes`` processes. For each count, two fresh
databases get the same budget: one used directly (each worker ~3 connections: Optuna's
pool, the heartbeat, the advisory lock), one through ``autometa storage-proxy`` (a
process of its own; workers hold one gRPC channel each, the proxy the connections). The
two modes run one after the other for each count, in alternating order over
``--repeats`` repetitions (medians reported), so a change in the machine's load hits
both.

Measured per run, as postgres_workers.py does: trials/s from the first claim to the last
tell; exactly ``--trials`` COMPLETE trials; claim, lock-wait and lock-held times; the
database's load (``pg_stat_database`` commits and rollbacks, peak client connections,
heartbeat rows, the server's ERROR lines); the CPU of the worker processes and of the
proxy process.

    python benchmarks/proxy_workers.py            # ~10 min on 2 cores
    python benchmarks/proxy_workers.py --workers 8 --trials 40 --processes 2 \\
        --repeats 1                               # ~30 s

Writes benchmarks/results/proxy_workers.json and .md (``--out``).
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import select
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from harness import (  # noqa: E402
    environment,
    load_average,
    markdown_table,
    text_table,
    write_results,
)
from postgres_monitor import Monitor, ServerLog  # noqa: E402
from postgres_runs import _get, cpu_ticks, outcome, quantiles, target  # noqa: E402
from proxy_worker_loop import process_main  # noqa: E402

#: Connections the benchmark's own server allows: 128 direct workers hold ~3 each.
MAX_CONNECTIONS = 1000


def _proc_cpu(pid: int) -> float:
    """CPU seconds (user + system) process ``pid`` has used so far (Linux)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return math.nan
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_proxy(url: str) -> tuple[subprocess.Popen[str], str]:
    """``autometa storage-proxy URL --port 0`` and the address it prints."""
    proc = subprocess.Popen([sys.executable, "-m", "autometa", "storage-proxy", url,
                             "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    ready, _, _ = select.select([proc.stdout], [], [], 120)
    line = proc.stdout.readline() if ready else ""  # type: ignore[union-attr]
    if not line.startswith("serving "):
        proc.kill()
        raise RuntimeError(f"the proxy did not start: {line!r} {proc.communicate()}")
    return proc, line.split(" on ", 1)[1].split()[0]


def run_once(url: str, study_name: str, monitor: Monitor, log: ServerLog, *, mode: str,
             workers: int, trials: int, processes: int) -> dict[str, Any]:
    """``workers`` simulated workers spend ``trials`` in a new study, ``mode`` "direct" or
    "proxy"; what it cost."""
    import optuna

    from autometa.study.storage import open_storage

    storage = open_storage(url)
    optuna.create_study(storage=storage, study_name=study_name, direction="minimize")
    storage.engine.dispose()
    beats_before = monitor.heartbeats()
    before = monitor.settled()
    # Started after the counters settle: its start-up (a few queries) is counted.
    proxy, address = (start_proxy(url) if mode == "proxy" else (None, url))
    log.mark()
    load = load_average()
    groups = [list(range(workers))[p::processes] for p in range(min(processes, workers))]
    context = multiprocessing.get_context("spawn")
    ready, results, start = context.Queue(), context.Queue(), context.Event()
    procs = [context.Process(target=process_main, daemon=True,
                             args=(address, study_name, trials, group, ready, start, results))
             for group in groups]
    try:
        with monitor.peak_connections() as peak:
            for process in procs:
                process.start()
            for _ in procs:
                _get(ready, procs)
            ticks = cpu_ticks()
            proxy_cpu = _proc_cpu(proxy.pid) if proxy is not None else math.nan
            start.set()
            gathered = [_get(results, procs) for _ in procs]
            ticks = tuple(b - a for a, b in zip(ticks, cpu_ticks(), strict=True))
            proxy_cpu = _proc_cpu(proxy.pid) - proxy_cpu if proxy is not None else math.nan
            for process in procs:
                process.join(timeout=60)
            with monitor.connect() as conn:
                proxy_connections = monitor.clients(conn) if proxy else 0
    finally:
        if proxy is not None:
            proxy.send_signal(signal.SIGTERM)
            proxy.communicate(timeout=60)
    after = monitor.settled()
    beats_after = monitor.heartbeats()
    errors = log.errors()

    reports = [r for g in gathered for r in g["reports"]]
    done, states, complete, worker_errors, ok, wall = outcome(
        url, study_name, trials, reports, f"{mode}, {workers} worker(s)")
    held = [s for g in gathered for s in g["lock_held_s"]]
    cores = os.cpu_count() or 1
    commits = after["commit"] - before["commit"]
    return {
        "mode": mode, "workers": workers, "trials": trials, "processes": len(groups),
        "complete": complete, "states": states, "ok": ok, "worker_errors": worker_errors[:5],
        "distinct_params": len({tuple(sorted(t.params.items())) for t in done}),
        "wall_s": wall, "trials_per_s": complete / wall if wall > 0 else math.nan,
        "claim_ms": quantiles([s for r in reports for s in r["claim_s"]]),
        "lock_wait_ms": quantiles([s for g in gathered for s in g["lock_wait_s"]]),
        "lock_held_ms": quantiles(held),
        "lock_busy": sum(held) / wall if wall > 0 else math.nan,
        "xact_commit": commits, "xact_rollback": after["rollback"] - before["rollback"],
        "commits_per_trial": commits / trials,
        "heartbeat_writes": sum(beats_after[k] - beats_before[k] for k in beats_after),
        "max_connections": peak[0], "proxy_connections": proxy_connections,
        "server_errors": None if errors is None else len(errors),
        "server_error_samples": None if errors is None else errors[:5],
        "machine_busy": ticks[0] / ticks[1] if ticks[1] else math.nan,
        "workers_cpu": sum(g["cpu_s"] for g in gathered) / (wall * cores),
        "proxy_cpu": proxy_cpu / (wall * cores) if proxy is not None else None,
        "load_average_1m_before": load,
    }


HEADERS = ["workers", "mode", "trials/s (range)", "proxy / direct (paired)", "claim (ms, median)",
           "lock held (ms, median)", "lock busy", "commits/trial", "peak connections",
           "CPU: workers / proxy", "exact budget"]


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per worker count and mode, the medians over the repetitions (runs' own keys), the
    range of trials/s and, for the proxy, the median of its ratios to direct's run of the
    same repetition."""
    out = []
    for w in dict.fromkeys(r["workers"] for r in runs):
        for mode in ("direct", "proxy"):
            mine = [r for r in runs if r["workers"] == w and r["mode"] == mode]
            if not mine:
                continue

            def med(get: Any, mine: list[dict[str, Any]] = mine) -> Any:
                values = [get(r) for r in mine]
                return None if None in values else statistics.median(values)

            paired = [r["trials_per_s"] / d["trials_per_s"] for r in mine for d in runs
                      if d["mode"] == "direct" and d["workers"] == w
                      and d.get("repeat") == r.get("repeat")] if mode == "proxy" else []
            out.append({
                "workers": w, "mode": mode, "runs": len(mine),
                "ok": all(r["ok"] for r in mine), "states": [r["states"] for r in mine],
                "trials_per_s": med(lambda r: r["trials_per_s"]),
                "trials_per_s_range": [min(r["trials_per_s"] for r in mine),
                                       max(r["trials_per_s"] for r in mine)],
                "paired_ratio": statistics.median(paired) if paired else None,
                "claim_ms": {"median": med(lambda r: r["claim_ms"]["median"])},
                "lock_held_ms": {"median": med(lambda r: r["lock_held_ms"]["median"])},
                "lock_busy": med(lambda r: r["lock_busy"]),
                "commits_per_trial": med(lambda r: r["commits_per_trial"]),
                "max_connections": max(r["max_connections"] for r in mine),
                "workers_cpu": med(lambda r: r["workers_cpu"]),
                "proxy_cpu": med(lambda r: r["proxy_cpu"]),
            })
    return out


def rows(summary: list[dict[str, Any]]) -> list[list[Any]]:
    """One table row per worker count and mode, with the proxy's throughput over direct's
    (the ratio of medians, and the median of the per-repetition ratios)."""
    out = []
    for run in summary:
        direct = [r["trials_per_s"] for r in summary
                  if r["workers"] == run["workers"] and r["mode"] == "direct"]
        ratio = (f"{run['trials_per_s'] / direct[0]:.2f}x"
                 + (f" ({run['paired_ratio']:.2f}x)" if run["paired_ratio"] else "")
                 if run["mode"] == "proxy" and direct else "")
        cpu = f"{run['workers_cpu']:.0%}" + (f" / {run['proxy_cpu']:.0%}"
                                              if run["proxy_cpu"] is not None else "")
        low, high = run["trials_per_s_range"]
        spread = f" ({low:.1f}-{high:.1f})" if run["runs"] > 1 else ""
        out.append([run["workers"], run["mode"], f"{run['trials_per_s']:.1f}{spread}", ratio,
                    f"{run['claim_ms']['median']:.0f}", f"{run['lock_held_ms']['median']:.1f}",
                    f"{run['lock_busy']:.0%}", f"{run['commits_per_trial']:.1f}",
                    run["max_connections"], cpu,
                    "yes" if run["ok"] else f"NO ({run['states']})"])
    return out


def notes(summary: list[dict[str, Any]]) -> list[str]:
    """What limits throughput, read off the summary (:func:`summarise`): the largest worker
    count, both modes."""
    runs = summary
    most = max(r["workers"] for r in runs)
    pick = {r["mode"]: r for r in runs if r["workers"] == most}
    if set(pick) != {"direct", "proxy"}:
        return []
    direct, proxy = pick["direct"], pick["proxy"]
    ratio = proxy["trials_per_s"] / direct["trials_per_s"]
    held = [r["lock_held_ms"]["median"] for r in runs if r["mode"] == "proxy"]
    held_direct = [r["lock_held_ms"]["median"] for r in runs if r["mode"] == "direct"]
    verdict = "meeting" if ratio >= 3 else "short of"
    return [
        "## What limits it", "",
        f"At {most} workers the proxy ran {ratio:.2f}x direct's trials/s "
        f"({proxy['trials_per_s']:.1f} against {direct['trials_per_s']:.1f}), {verdict} 3x. "
        "The claim is still one serial section per trial "
        f"(the lock busy {proxy['lock_busy']:.0%} of the run through the proxy): its storage "
        "calls are made one after another, each a gRPC call to the proxy and the query it "
        "makes, so trials/s stays under 1 / lock held = "
        f"{1e3 / proxy['lock_held_ms']['median']:.1f}/s whatever the number of workers. "
        f"The section held {min(held):.0f}-{max(held):.0f} ms through the proxy and "
        f"{min(held_direct):.0f}-{max(held_direct):.0f} ms directly over the worker counts: "
        "through the proxy each storage call still costs a query, plus a gRPC hop and the "
        "proxy's CPU (one Python process), so what it gains is what the workers' own "
        "connections cost the server and the cores (directly "
        f"{direct['max_connections']} connections and {direct['commits_per_trial']:.1f} "
        f"commits per trial, against {proxy['max_connections']} and "
        f"{proxy['commits_per_trial']:.1f}), not a shorter section. Beyond this, the claim "
        "itself would have to move into the proxy (one call per trial instead of one per "
        "storage operation).",
    ]


def render(result: dict[str, Any]) -> str:
    env, settings = result["environment"], result["settings"]
    summary = summarise(result["runs"])
    return "\n".join([
        "# Many workers on one PostgreSQL server: direct and through the storage proxy", "",
        f"{settings['trials']} near-instant dummy trials per run (autometa's claim, "
        "Heartbeat, three suggests, one report, tell), each simulated worker a thread with "
        f"its own storage client, over {settings['processes']} processes; for each count "
        "the two modes back to back (their order alternating) on fresh databases of one "
        f"throwaway local server, {settings['repeats']} repetitions, medians "
        f"(fsync off, max_connections {MAX_CONNECTIONS}). {env['cpu']}, {env['cores']} "
        f"cores, load average {env['load_average_1m']:.2f} at start; "
        f"{env['postgresql'].split(' on ')[0]}; optuna {env['versions']['optuna']}, grpcio "
        f"{env['versions']['grpcio']}; autometa {env['autometa_commit']}; {env['date']}; "
        f"{result['runtime_s'] / 60:.1f} min (`{env['command']}`).", "",
        markdown_table(HEADERS, rows(summary)), "",
        "*claim*: one successful `claim()` (the lock, failing dead trials, counting the "
        "budget, `ask`); *lock held*: the serial section; *lock busy*: its share of the "
        "run; *commits/trial*: the database's committed transactions (`pg_stat_database`) "
        "per trial; *peak connections*: client connections to the database (polled every "
        "50 ms); *CPU*: share of all cores used by the worker processes and by the proxy "
        "process during the run.", "",
        *notes(summary),
    ])


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=300, help="budget per run (300)")
    parser.add_argument("--workers", default="8,32,128",
                        help="simulated worker counts, comma-separated (8,32,128)")
    parser.add_argument("--repeats", type=int, default=2,
                        help="repetitions, the modes' order alternating (2)")
    parser.add_argument("--processes", type=int, default=8,
                        help="processes the simulated workers are spread over (8)")
    parser.add_argument("--url", help="an existing server's database (postgresql+psycopg://"
                                      "...); default: start a throwaway server")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--name", default="proxy_workers")
    parser.add_argument("--report-only", action="store_true",
                        help="measure nothing: rebuild the Markdown from <out>/<name>.json")
    args = parser.parse_args(argv)
    workers = [int(w) for w in args.workers.split(",")]
    if args.report_only:
        result = json.loads((args.out / f"{args.name}.json").read_text())
        write_results(args.name, result, render(result), args.out)
        return result

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    server = None
    if args.url is None:
        sys.path.insert(0, str(REPO / "tests"))
        import pg_server

        pg_server._SETTINGS["max_connections"] = str(MAX_CONNECTIONS)
        server = pg_server.PostgresServer().start()
    tag = time.strftime("%H%M%S")
    began = time.perf_counter()
    runs: list[dict[str, Any]] = []
    try:
        _, monitor, _ = target(server, args.url, "pxw_setup")
        env = environment(extra_versions=("optuna", "sqlalchemy", "psycopg", "grpcio"))
        with monitor.connect() as conn:
            env["postgresql"] = conn.execute("SELECT version()").fetchone()[0]
        for repeat, w in ((r, w) for r in range(args.repeats) for w in workers):
            for mode in ("direct", "proxy")[::1 if repeat % 2 == 0 else -1]:
                label = f"pxw_{tag}_r{repeat}_{mode}_w{w}"
                url, monitor, log = target(server, args.url, label)
                run = run_once(url, label, monitor, log, mode=mode, workers=w,
                               trials=args.trials, processes=args.processes)
                run["repeat"] = repeat
                runs.append(run)
                print(f"repeat {repeat}, {w} workers, {mode}: {run['trials_per_s']:.1f} "
                      f"trials/s, claim "
                      f"{run['claim_ms']['median']:.0f} ms, {run['commits_per_trial']:.1f} "
                      f"commits/trial, {run['max_connections']} connections"
                      + ("" if run["ok"] else "  FAILURE"), flush=True)
                if server is not None:
                    server.drop_database(label)
    finally:
        if server is not None:
            server.stop()
    result = {"environment": env, "settings": vars(args) | {"out": str(args.out),
                                                             "workers": workers},
              "runtime_s": time.perf_counter() - began, "runs": runs}
    print(text_table(HEADERS, rows(summarise(runs))))
    print("\n".join(notes(summarise(runs))))
    for path in write_results(args.name, result, render(result), args.out):
        print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
