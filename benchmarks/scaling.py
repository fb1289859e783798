"""Parallel search on one machine: finished trials per hour with 1 and 2 workers, and the
pool's own overhead.

A fixed workload of equal-cost trials (MAML with every hyperparameter fixed on the 10-shot
sinusoid, an MLP 1-40-40-1, no pruning), run as real ``autometa.search`` calls with
``workers`` = 1 and 2, one torch thread per worker, interleaved in one run (1, 2, 1, 2, ...)
so that a change in the machine's load hits both. Reported per run:

* **throughput**: finished trials per hour in steady state (each worker's trials over its
  own span, first start to last end, from the storage, summed over workers: what a long
  search gets), over the trials' whole span (first start to last end: the workers' start
  skew included), and over the whole call (worker start-up and the leaderboard included);
* **overhead**: on each worker, the time from one trial's end to the next trial's start
  (claiming against the budget under the storage lock, sampling, building the model), ms.

The ratio 2 workers / 1 worker is the median of the paired ratios of the repetitions.

    python benchmarks/scaling.py                  # ~3 min on 2 cores
    python benchmarks/scaling.py --trials 4 --meta-steps 20 --repeats 1   # a quick look

Prints a table and writes benchmarks/results/scaling.json and scaling.md (``--out``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

#: The fixed workload: every hyperparameter fixed, so every trial costs the same.
MAML = {"inner_lr": 0.01, "inner_steps": 1, "meta_lr": 0.001, "meta_batch_size": 25,
        "first_order": False, "strategy": "vmap"}
MLP = {"hidden": 40, "layers": 2}
TASK = {"val_episodes": 100, "test_episodes": 100, "eval_queries": 100}


def run_once(workers: int, *, trials: int, meta_steps: int, directory: Path) -> dict[str, Any]:
    """One search with ``workers`` workers; its throughput and per-worker gaps."""
    import optuna

    import autometa

    storage = f"sqlite:///{directory / f'w{workers}.db'}"
    start = time.perf_counter()
    autometa.search("sinusoid", algorithms=["maml"], sources=["mlp"],
                    algorithm_params={"maml": MAML}, source_params={"mlp": MLP},
                    task_params=TASK, n_trials=trials, meta_steps=meta_steps,
                    eval_every=meta_steps, pruner="none", top_k=1, threads=1,
                    devices=["cpu"] * workers, storage=storage,
                    artifacts=str(directory / "artifacts"), study_name=f"w{workers}")
    wall = time.perf_counter() - start
    done = optuna.load_study(study_name=f"w{workers}", storage=storage).trials
    assert len(done) == trials and all(t.state.name == "COMPLETE" for t in done)
    first = min(t.datetime_start for t in done)
    last = max(t.datetime_complete for t in done)
    span = (last - first).total_seconds()
    gaps, steady = [], 0.0
    for worker in {t.user_attrs["worker"]["worker"] for t in done}:
        mine = sorted((t for t in done if t.user_attrs["worker"]["worker"] == worker),
                      key=lambda t: t.datetime_start)
        gaps += [(b.datetime_start - a.datetime_complete).total_seconds() * 1e3
                 for a, b in zip(mine, mine[1:], strict=False)]
        own = (mine[-1].datetime_complete - mine[0].datetime_start).total_seconds()
        steady += 3600 * len(mine) / own
    return {"workers": workers, "trials": trials, "span_s": span, "wall_s": wall,
            "trials_per_hour": steady,
            "trials_per_hour_span": 3600 * trials / span,
            "trials_per_hour_wall": 3600 * trials / wall,
            "trial_s": statistics.median((t.datetime_complete - t.datetime_start)
                                         .total_seconds() for t in done),
            "gap_ms": statistics.median(gaps) if gaps else float("nan"),
            "gap_ms_max": max(gaps) if gaps else float("nan")}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=8, help="trials per search (8)")
    parser.add_argument("--meta-steps", type=int, default=600, help="per trial (600)")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved pairs (2)")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--name", default="scaling")
    args = parser.parse_args(argv)

    import optuna
    from harness import environment, markdown_table, paired_ratio, print_and_write, ratio

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for workers in (1, 2):
                directory = Path(tmp) / f"r{repeat}"
                directory.mkdir(exist_ok=True)
                run = run_once(workers, trials=args.trials, meta_steps=args.meta_steps,
                               directory=directory)
                run["repeat"] = repeat
                runs.append(run)
                print(f"repeat {repeat}, {workers} worker(s): {run['trials_per_hour']:.0f} "
                      f"trials/h, gap {run['gap_ms']:.0f} ms", flush=True)
    by = {(r["repeat"], r["workers"]): r for r in runs}
    ratios = [by[(k, 2)]["trials_per_hour"] / by[(k, 1)]["trials_per_hour"]
              for k in range(args.repeats)]

    def paired(key: str) -> float:
        """2 workers over 1, per repetition, then the median."""
        return paired_ratio([by[(k, 2)][key] for k in range(args.repeats)],
                            [by[(k, 1)][key] for k in range(args.repeats)])

    summary = {"ratio": paired("trials_per_hour"), "ratios": ratios,
               "ratio_span": paired("trials_per_hour_span"),
               "ratio_wall": paired("trials_per_hour_wall"),
               "trial_time_ratio": paired("trial_s"), "target": 1.8}
    lines = ["# Parallel search: trials per hour, 1 and 2 workers", "",
             f"{args.trials} equal-cost trials per search (MAML, sinusoid, MLP 1-40-40-1, "
             f"{args.meta_steps} meta-steps, one torch thread per worker), "
             f"{args.repeats} interleaved repetitions.", "",
             markdown_table(
                 ["workers", "repeat", "trials/h (steady state)", "trials/h (trials' span)",
                  "trials/h (whole call)", "median trial s",
                  "gap between trials ms (median / max)"],
                 [[r["workers"], r["repeat"], f"{r['trials_per_hour']:.0f}",
                   f"{r['trials_per_hour_span']:.0f}", f"{r['trials_per_hour_wall']:.0f}",
                   f"{r['trial_s']:.2f}", f"{r['gap_ms']:.0f} / {r['gap_ms_max']:.0f}"]
                  for r in runs])]
    lines += ["", f"**2 workers / 1 worker: {ratio(summary['ratio'])}** in steady state "
              f"(paired, per repetition: {', '.join(f'{x:.2f}' for x in ratios)}; target "
              f">= 1.8x); {ratio(summary['ratio_span'])} over the trials' span, "
              f"{ratio(summary['ratio_wall'])} over the whole call (worker start-up and the "
              f"leaderboard included). A trial took {ratio(summary['trial_time_ratio'])} as long "
              "with two workers sharing the two cores."]
    markdown = "\n".join(lines)
    result = {"environment": environment(), "settings": vars(args) | {"out": str(args.out)},
              "runs": runs, "summary": summary}
    print_and_write(args.name, result, markdown, markdown, args.out)
    return result


if __name__ == "__main__":
    main()
