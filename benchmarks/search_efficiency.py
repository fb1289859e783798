"""Search efficiency: how often, and with how much compute, each search strategy reaches
the best meta-val score of an unpruned random search on the same task, seed and space.

Every strategy is a real ``autometa.search`` (one worker, one torch thread), run in
chunks of trials until its best ranked searched trial reaches the target (or its cap of
searched trials, random search's count):

* ``random``: Optuna's RandomSampler, no pruning, 100 trials (glyphs: 30, at a smaller
  scale, :data:`TASKS`' ``scale``): it sets the target (its best searched trial) and the
  reference compute (its whole run).
* ``tpe``, ``tpe+median``, ``tpe+wilcoxon``, ``tpe+hyperband``: multivariate TPE with
  each pruner.
* ``portfolio+<p>``: every (algorithm, source) pair first at its paper defaults, then
  TPE with pruner ``p``; ``warm+<p>``: TPE with ``p``, warm-started from a TPE study of
  the related task (the sinusoid with 5 shots instead of 10; the glyphs of another
  seed), whose compute is not counted. ``p`` is chosen on the **selection seeds**
  (``--select-seeds``, disjoint from the reported ``--seeds``): the pruned strategy with
  the highest success rate there, then the least compute.
* ``top-k``: Egele et al. (2023)'s baseline: random configurations trained for one
  evaluation interval, then the best 3 trained for the whole budget; 30, 60, then 100
  short trials.

A seed that never reaches the target is **unreached**: each strategy's success rate
counts it, its compute (meta-steps, wall seconds: median and quartiles) never does.
Strategies are compared in pairs over the seeds (sign test, Wilcoxon signed-rank with an
unreached seed at the worst rank, Holm's correction). Baseline trials (a classification
task's ``nearest-centroid``, ``linear-probe``, ``linear-svm`` on ``raw``: 0 meta-steps,
outside the budget) never count towards the target nor the compute; whether a baseline
alone reaches the target is reported. Modules: ``search_efficiency_runs`` (the
searches), ``search_efficiency_stats``, ``search_efficiency_report``.

    python benchmarks/search_efficiency.py     # both tasks, 10 + 3 selection seeds (~17 h)
    python benchmarks/search_efficiency.py --tasks sinusoid --seeds 0,1,2 --select-seeds 7
    python benchmarks/search_efficiency.py --random-trials 8 --meta-steps 40 \\
        --eval-every 10 --seeds 2 --select-seeds 1 --results /tmp/se   # a quick look

``--seeds N`` (one number) means N seeds (0..N-1; selection seeds from 1000); a list is
given with commas or as several values. Prints the tables and writes
benchmarks/results/search_efficiency_<task>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import sys
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from harness import cpu_model, git_commit, load_average, write_results  # noqa: E402
from search_efficiency_report import markdown  # noqa: E402
from search_efficiency_runs import one_seed  # noqa: E402
from search_efficiency_stats import choose_pruner, paired, summarise  # noqa: E402

#: The searched space of each task: every algorithm that serves it with a small source
#: model; finetune's L-BFGS adaptation is left out (0.03-0.7 s per episode would make
#: evaluations, not meta-training, the cost being compared).
TASKS: dict[str, dict[str, Any]] = {
    "sinusoid": {
        "task_params": {"shots": 10, "val_episodes": 100, "test_episodes": 2,
                        "eval_queries": 50},
        "related": {"shots": 5},  # the warm start's earlier task
        "algorithms": ["maml", "metasgd", "reptile", "finetune"],
        "sources": ["mlp"],
        "algorithm_params": {"finetune": {"optimizer": ["sgd", "adam"]}},
        "source_params": {"mlp": {"hidden": 40, "layers": 2}},
        # The scale (the earlier 3-seed table's).
        "scale": {"random_trials": 100, "related_trials": 30, "meta_steps": 450,
                  "eval_every": 50},
    },
    "glyphs": {
        "task_params": {"ways": 5, "shots": 1, "val_episodes": 100, "test_episodes": 2},
        "related": {"seed_offset": 1},  # the glyphs of another seed
        "algorithms": ["protonet", "maml", "finetune"],
        "sources": ["conv4"],
        "algorithm_params": {"finetune": {"optimizer": ["sgd", "adam"]},
                             "maml": {"first_order": True}},
        "source_params": {"conv4": {"channels": 32}},
        # A conv4 trial of 450 meta-steps takes 1-9 min here: 13 seeds at the sinusoid's
        # scale would take over a week (benchmarks/README.md, Cost).
        "scale": {"random_trials": 30, "related_trials": 10, "meta_steps": 100,
                  "eval_every": 25},
    },
}
#: Where ``--select-seeds N`` starts, far from the reported seeds ``--seeds N``'s 0..N-1.
SELECT_BASE = 1000


def parse_seeds(values: list[str], base: int) -> list[int]:
    """``["10"]`` -> 10 seeds from ``base``; ``["0,1,2"]``, ``["0", "1", "2"]`` or
    ``["5,"]`` -> that list."""
    items = [v for value in values for v in value.split(",") if v.strip()]
    try:
        seeds = [int(v) for v in items]
    except ValueError as exc:
        raise SystemExit(f"seeds: expected a count or a list of integers, got "
                         f"{' '.join(values)!r}") from exc
    if len(values) == 1 and "," not in values[0]:
        seeds = list(range(base, base + seeds[0]))
    if not seeds or len(set(seeds)) != len(seeds):
        raise SystemExit(f"seeds: expected distinct seeds, got {' '.join(values)!r}")
    return seeds


class LoadSampler:
    """The machine's 1-minute load average, sampled every ``every`` seconds meanwhile."""

    def __init__(self, every: float = 30.0) -> None:
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every,), daemon=True)
        self.start = load_average() or 0.0
        self._thread.start()

    def _run(self, every: float) -> None:
        while not self._stop.wait(every):
            self.samples.append(load_average() or 0.0)

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        self._thread.join()
        end = load_average() or 0.0
        seen = [self.start, *self.samples, end]
        return {"start": self.start, "end": end, "mean": sum(seen) / len(seen),
                "max": max(seen), "samples": len(seen)}


def environment(minutes: float, load: dict[str, Any]) -> dict[str, Any]:
    """This benchmark's own record of the machine, with the load during the run."""
    import optuna
    import torch

    return {"cpu": f"{cpu_model()}, {os.cpu_count()} cores",
            "torch": torch.__version__, "python": platform.python_version(),
            "optuna": optuna.__version__, "commit": git_commit(mark_dirty=False) or "?",
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "minutes": minutes,
            "load": load, "command": " ".join(sys.argv[1:])}


def spec(task: str, args: argparse.Namespace) -> dict[str, Any]:
    """:data:`TASKS`' entry of ``task``, its scale overridden by the options given."""
    out = dict(TASKS[task])
    if args.val_episodes:
        out["task_params"] = {**out["task_params"], "val_episodes": args.val_episodes}
    for key, default in out.pop("scale").items():
        given = getattr(args, key)
        out[key] = default if given is None else given
    return out


def run_seeds(args: argparse.Namespace, jobs: list[tuple[str, int, str, str | None]]
              ) -> list[dict[str, Any]]:
    """``(task, seed, role, pruner)`` jobs in ``--processes`` spawned processes."""
    processes = max(1, min(args.processes, len(jobs)))
    calls = [(args, spec(t, args), t, s, role, p) for t, s, role, p in jobs]
    if processes == 1:
        per_seed = [one_seed(*call) for call in calls]
    else:
        with multiprocessing.get_context("spawn").Pool(processes) as pool:
            per_seed = pool.starmap(one_seed, calls, chunksize=1)
    return [r for rows in per_seed for r in rows]


def task_result(task: str, rows: list[dict[str, Any]], selection_rows: list[dict[str, Any]],
                pruner: str, args: dict[str, Any], env: dict[str, Any]) -> dict[str, Any]:
    """One task's result: its rows, their statistics and the selection that was made."""
    mine = [r for r in rows if r["task"] == task]
    picked = [r for r in selection_rows if r["task"] == task]
    sized = spec(task, argparse.Namespace(**args))
    kept = {k: sized[k] for k in ("random_trials", "related_trials", "meta_steps",
                                  "eval_every")}
    return {"task": task, "environment": env, "args": args,
            "scale": {**kept, "val_episodes": sized["task_params"]["val_episodes"]},
            "seeds": sorted({r["seed"] for r in mine}),
            "select_seeds": sorted({r["seed"] for r in picked}), "pruner": pruner,
            "direction": mine[0]["direction"] if mine else "minimize",
            "selection": choose_pruner(picked)[1] if picked else [],
            "summary": summarise(mine), "paired": paired(mine),
            "rows": mine, "selection_rows": picked}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", "--task", nargs="+", choices=sorted(TASKS),
                        default=["sinusoid", "glyphs"])
    parser.add_argument("--seeds", nargs="+", default=["10"],
                        help="reported seeds: a count (from 0) or a list (default 10)")
    parser.add_argument("--select-seeds", nargs="+", default=["3"],
                        help=f"seeds the pruner is chosen on: a count (from {SELECT_BASE}) or "
                             "a list, disjoint from --seeds (default 3)")
    scale = "(default: the task's, TASKS' scale: sinusoid %s, glyphs %s)"
    for flag, key in (("--random-trials", "random_trials"), ("--related-trials",
                                                             "related_trials"),
                      ("--meta-steps", "meta_steps"), ("--eval-every", "eval_every")):
        parser.add_argument(flag, type=int, help=scale % (
            TASKS["sinusoid"]["scale"][key], TASKS["glyphs"]["scale"][key]))
    parser.add_argument("--val-episodes", type=int,
                        help="meta-val episodes per evaluation (default: the task's, 100)")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--out", default="/tmp/autometa-search-efficiency",
                        help="where the studies' storages and trial states go")
    parser.add_argument("--results", default=str(HERE / "results"))
    parser.add_argument("--from-json", type=Path,
                        help="re-make the tables from a results JSON file of an earlier run")
    args = parser.parse_args(argv)
    if args.from_json:
        result = json.loads(args.from_json.read_text())
        text = markdown(result)
        print(text)
        write_results(f"search_efficiency_{result['task']}", result, text,
                      Path(args.results), indent=1)
        return 0
    seeds = parse_seeds(args.seeds, 0)
    select = parse_seeds(args.select_seeds, SELECT_BASE)
    if set(seeds) & set(select):
        raise SystemExit(f"--select-seeds {select} overlap --seeds {seeds}: the pruner must "
                         "be chosen on other seeds than those reported")
    start, load = time.time(), LoadSampler()
    selection_rows = run_seeds(args, [(t, s, "select", None) for t in args.tasks
                                      for s in select])
    pruners = {t: choose_pruner([r for r in selection_rows if r["task"] == t])[0]
               for t in args.tasks}
    rows = run_seeds(args, [(t, s, "report", pruners[t]) for t in args.tasks for s in seeds])
    env = environment((time.time() - start) / 60, load.stop())
    kept = {k: v for k, v in vars(args).items() if k != "from_json"}
    kept.update(seeds=seeds, select_seeds=select)
    for task in args.tasks:
        result = task_result(task, rows, selection_rows, pruners[task], kept, env)
        text = markdown(result)
        print(text)
        write_results(f"search_efficiency_{task}", result, text, Path(args.results),
                      indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
