"""Search efficiency: the compute each search strategy needs to reach the best meta-val
score of a 100-trial unpruned random search, on the same task, seed and space.

Every strategy is a real ``autometa.search`` (one worker, one torch thread), run in
chunks of trials until its best ranked trial reaches the target (or its trial cap):

* ``random``: Optuna's RandomSampler, no pruning, 100 trials: it sets the target (its
  best) and the reference compute (meta-steps up to the trial that found it).
* ``tpe``, ``tpe+median``, ``tpe+wilcoxon``, ``tpe+hyperband``: multivariate TPE with
  each pruner.
* ``portfolio+<best>``: every (algorithm, source) pair first at its paper defaults,
  then TPE with the pruner that needed the least compute above.
* ``warm+<best>``: TPE with that pruner, warm-started from a TPE study of the related
  task (the sinusoid with 5 shots instead of 10; the glyphs of another seed); the
  related study's compute is not counted (it was run before, for another task).
* ``top-k``: Egele et al. (2023)'s baseline: random configurations trained for one
  evaluation interval, then the best 3 (by then) trained for the whole budget
  (autometa's warm start from the short study); 30, 60, then 100 short trials (of a
  100-trial random search).

Compute is meta-steps (the steps each trial ran before it finished or was pruned; a
trial that does not meta-train counts 0) and wall seconds (each trial's start to end,
from the storage: training, evaluation and the worker's own work). Seeds run in
parallel processes, so wall times of one run share the machine alike.

    python benchmarks/search_efficiency.py                      # sinusoid, 3 seeds (~40 min)
    python benchmarks/search_efficiency.py --task glyphs --seeds 0 1
    python benchmarks/search_efficiency.py --random-trials 12 --meta-steps 60 \\
        --eval-every 20 --seeds 0 --out /tmp/se              # a quick look

Prints a table and writes benchmarks/results/search_efficiency_<task>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from harness import cpu_model, git_commit, markdown_table, write_results  # noqa: E402

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
    },
    "glyphs": {
        "task_params": {"ways": 5, "shots": 1, "val_episodes": 100, "test_episodes": 2},
        "related": {"seed_offset": 1},  # the glyphs of another seed
        "algorithms": ["protonet", "maml", "finetune"],
        "sources": ["conv4"],
        "algorithm_params": {"finetune": {"optimizer": ["sgd", "adam"]},
                             "maml": {"first_order": True}},
        "source_params": {"conv4": {"channels": 32}},
    },
}
PRUNED_STRATEGIES = ("tpe", "tpe+median", "tpe+wilcoxon", "tpe+hyperband")
CHUNK = 5  # trials per resume while looking for the target


def trial_cost(trial: Any) -> tuple[int, float]:
    """(meta-steps run, wall seconds) of one finished Optuna trial."""
    steps = int(trial.user_attrs.get("meta_steps") or 0)  # recorded by the worker
    wall = (trial.datetime_complete - trial.datetime_start).total_seconds() \
        if trial.datetime_complete and trial.datetime_start else 0.0
    return steps, wall


def reach(study: Any, target: float | None, meta_steps: int) -> dict[str, Any]:
    """Cumulative compute up to the first ranked trial scoring ``target`` or better
    (minimised metric), or over all trials if none did (``reached`` False)."""
    from autometa.study.trials import ranked

    steps = wall = 0.0
    best = float("inf")
    trials = sorted((t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED", "FAIL")),
                    key=lambda t: t.number)
    for n, trial in enumerate(trials, start=1):
        s, w = trial_cost(trial)
        steps, wall = steps + s, wall + w
        if ranked(trial):
            best = min(best, float(trial.value))
        if target is not None and best <= target + 1e-6 * abs(target):  # float32 sums
            return {"reached": True, "trials": n, "meta_steps": steps, "wall_s": wall,
                    "best": best}
    return {"reached": False, "trials": len(trials), "meta_steps": steps, "wall_s": wall,
            "best": best}


def run_strategy(name: str, settings: dict[str, Any], *, target: float | None, cap: int,
                 meta_steps: int) -> dict[str, Any]:
    """Run ``settings`` in chunks of :data:`CHUNK` trials until ``target`` or ``cap``."""
    import optuna

    import autometa

    n = 0
    while True:
        n = min(cap, n + CHUNK)
        autometa.search(**settings, n_trials=n)
        study = optuna.load_study(study_name=settings["study_name"],
                                  storage=settings["storage"])
        result = reach(study, target, meta_steps)
        if result["reached"] or n >= cap:
            return {"strategy": name, **result}


def one_seed(args: argparse.Namespace, seed: int) -> list[dict[str, Any]]:
    """Every strategy on one seed; the rows of the table."""
    import torch

    import autometa

    torch.set_num_threads(1)
    logging.disable(logging.WARNING)
    spec = TASKS[args.task]
    out = Path(args.out) / f"{args.task}-seed{seed}"
    out.mkdir(parents=True, exist_ok=True)
    storage = f"sqlite:///{out / 'studies.db'}"
    base = {"task": args.task, "task_params": spec["task_params"],
            "algorithms": spec["algorithms"], "sources": spec["sources"],
            "algorithm_params": spec["algorithm_params"],
            "source_params": spec["source_params"], "meta_steps": args.meta_steps,
            "eval_every": args.eval_every, "seed": seed, "storage": storage,
            "artifacts": str(out / "artifacts"), "top_k": 1, "keep": 1, "threads": 1}

    def settings(study: str, **more: Any) -> dict[str, Any]:
        return {**base, "study_name": study, **more}

    cap, steps = args.random_trials, args.meta_steps
    autometa.search(**settings("random", sampler="random", pruner="none"), n_trials=cap)
    whole = reach_study(storage, "random", float("-inf"), steps)
    target = whole["best"]
    rows = [{**reach_study(storage, "random", target, steps), "strategy": "random",
             "total_trials": whole["trials"], "total_meta_steps": whole["meta_steps"],
             "total_wall_s": whole["wall_s"]}]
    for name in PRUNED_STRATEGIES:
        pruner = name.partition("+")[2] or "none"
        rows.append(run_strategy(name, settings(name, pruner=pruner), target=target,
                                 cap=cap, meta_steps=steps))
    best = min(rows[1:], key=lambda r: (not r["reached"], r["meta_steps"]))["strategy"]
    pruner = best.partition("+")[2] or "none"
    rows.append(run_strategy(f"portfolio+{pruner}",
                             settings("portfolio", pruner=pruner, initial="portfolio"),
                             target=target, cap=cap, meta_steps=steps))
    related = related_study(args, seed, base, pruner)
    rows.append(run_strategy(f"warm+{pruner}",
                             settings("warm", pruner=pruner, warm_start=[related]),
                             target=target, cap=cap, meta_steps=steps))
    rows.append(top_k(settings, target=target, meta_steps=steps, eval_every=args.eval_every,
                      most=cap))
    for row in rows:
        row.update(seed=seed, target=target)
    return rows


def reach_study(storage: str, study: str, target: float, meta_steps: int) -> dict[str, Any]:
    import optuna

    return reach(optuna.load_study(study_name=study, storage=storage), target, meta_steps)


def related_study(args: argparse.Namespace, seed: int, base: dict[str, Any],
                  pruner: str) -> str:
    """A TPE study of the related task (:data:`TASKS`' ``related``), in its own storage;
    returns ``"study@url"`` for ``warm_start``."""
    import autometa

    spec = TASKS[args.task]
    related = dict(spec["related"])
    offset = related.pop("seed_offset", 0)
    url = base["storage"].replace("studies.db", "related.db")
    autometa.search(**{**base, "storage": url, "seed": seed + offset,
                       "task_params": {**spec["task_params"], **related}},
                    study_name="related", pruner=pruner, n_trials=args.related_trials)
    return f"related@{url}"


def top_k(settings: Any, *, target: float, meta_steps: int, eval_every: int, most: int
          ) -> dict[str, Any]:
    """Egele et al. (2023): N random configurations for one interval, then the best 3
    continued to ``meta_steps``; N = 30 %, 60 % and 100 % of ``most`` until the target is
    reached (the short trials are shared: each round adds to them)."""
    import optuna

    import autometa

    short = settings("short", sampler="random", pruner="none", meta_steps=eval_every)
    result: dict[str, Any] = {}
    for n in sorted({max(3, round(most * f)) for f in (0.3, 0.6, 1.0)}):
        autometa.search(**short, n_trials=n)
        first = reach_study(short["storage"], "short", float("-inf"), eval_every)
        full = settings(f"top3-of-{n}", pruner="none", warm_start=["short"])
        autometa.search(**full, n_trials=3)
        second = reach(optuna.load_study(study_name=full["study_name"],
                                         storage=full["storage"]), target, meta_steps)
        result = {"strategy": "top-k", "reached": second["reached"],
                  "trials": first["trials"] + second["trials"],
                  "meta_steps": first["meta_steps"] + second["meta_steps"],
                  "wall_s": first["wall_s"] + second["wall_s"], "best": second["best"]}
        if result["reached"]:
            break
    return result


def family(strategy: str) -> str:
    """``portfolio+median`` -> ``portfolio`` (its pruner is chosen per seed); others as is."""
    return strategy.partition("+")[0] if strategy.startswith(("portfolio", "warm")) \
        else strategy


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per strategy: seeds reaching the target, and median ratios (over seeds) of its
    compute to random search's: its whole 100 trials, and up to the trial that found its
    best. A strategy that did not reach the target counts its whole compute."""
    random = {r["seed"]: r for r in rows if r["strategy"] == "random"}

    def ratio(mine: list[dict[str, Any]], key: str, of: str) -> float:
        return statistics.median(r[key] / max(random[r["seed"]][of], 1e-9) for r in mine)

    out = []
    for name in dict.fromkeys(family(r["strategy"]) for r in rows):
        mine = [r for r in rows if family(r["strategy"]) == name]
        out.append({"strategy": ", ".join(sorted({r["strategy"] for r in mine})),
                    "reached": f"{sum(r['reached'] for r in mine)}/{len(mine)}",
                    "trials": statistics.median(r["trials"] for r in mine),
                    "meta_steps": statistics.median(r["meta_steps"] for r in mine),
                    "steps_vs_all": ratio(mine, "meta_steps", "total_meta_steps"),
                    "wall_vs_all": ratio(mine, "wall_s", "total_wall_s"),
                    "steps_vs_best": ratio(mine, "meta_steps", "meta_steps"),
                    "trials_vs_best": ratio(mine, "trials", "trials")})
    return out


def markdown(summary: list[dict[str, Any]], rows: list[dict[str, Any]],
             args: argparse.Namespace, env: dict[str, Any]) -> str:
    lines = [f"# Search efficiency: {args.task}", "",
             f"**Environment.** {env['cpu']}, torch {env['torch']} (1 thread per process), "
             f"Python {env['python']}, Optuna {env['optuna']}, autometa {env['commit']}; "
             f"{env['date']}; {env['minutes']:.0f} min.", "",
             f"**Setting.** target = best meta-val MSE/error of {args.random_trials} unpruned "
             f"random trials (same seed); {args.meta_steps} meta-steps per trial, meta-val "
             f"every {args.eval_every}; seeds {args.seeds}. Compute to reach the target "
             "(all of it if not reached), median over seeds. Ratios, per seed then the "
             "median: to random search's whole run (meta-steps, wall), and to random "
             "search's compute up to the trial that found its best (meta-steps, trials).",
             "", markdown_table(
                 ["strategy", "reached", "trials", "meta-steps", "steps ÷ random's 100",
                  "wall ÷ random's 100", "steps ÷ random's to best",
                  "trials ÷ random's to best"],
                 [[s["strategy"], s["reached"], f"{s['trials']:.0f}", f"{s['meta_steps']:,.0f}",
                   f"{s['steps_vs_all']:.2f}", f"{s['wall_vs_all']:.2f}",
                   f"{s['steps_vs_best']:.2f}", f"{s['trials_vs_best']:.2f}"]
                  for s in summary]),
             "", "Per seed:", "", markdown_table(
                 ["seed", "strategy", "target", "best", "reached", "trials", "meta-steps",
                  "wall s"],
                 [[r["seed"], r["strategy"], f"{r['target']:.4f}", f"{r['best']:.4f}",
                   r["reached"], r["trials"], f"{r['meta_steps']:,.0f}", f"{r['wall_s']:.0f}"]
                  for r in rows])]
    lines += ["", f"Command: `python benchmarks/search_efficiency.py {env['command']}`"]
    return "\n".join(lines) + "\n"


def environment(minutes: float) -> dict[str, Any]:
    """This benchmark's own record of the machine (its results have always kept this form)."""
    import optuna
    import torch

    return {"cpu": f"{cpu_model()}, {multiprocessing.cpu_count()} cores",
            "torch": torch.__version__, "python": platform.python_version(),
            "optuna": optuna.__version__, "commit": git_commit(mark_dirty=False) or "?",
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "minutes": minutes, "command": " ".join(sys.argv[1:])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=sorted(TASKS), default="sinusoid")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--random-trials", type=int, default=100)
    parser.add_argument("--related-trials", type=int, default=30)
    parser.add_argument("--meta-steps", type=int, default=450)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--out", default="/tmp/autometa-search-efficiency",
                        help="where the studies' storages and trial states go")
    parser.add_argument("--results", default=str(HERE / "results"))
    parser.add_argument("--from-json", type=Path,
                        help="re-make the tables from a results JSON file of an earlier run")
    args = parser.parse_args(argv)
    start = time.time()
    if args.from_json:
        earlier = json.loads(args.from_json.read_text())
        rows, env = earlier["rows"], earlier["environment"]
        args = argparse.Namespace(**{**earlier["args"], "results": args.results})
    else:
        processes = min(args.processes, len(args.seeds))
        with multiprocessing.get_context("spawn").Pool(processes) as pool:
            per_seed = pool.starmap(one_seed, [(args, s) for s in args.seeds])
        rows = [r for seed_rows in per_seed for r in seed_rows]
        env = environment((time.time() - start) / 60)
    summary = summarise(rows)
    text = markdown(summary, rows, args, env)
    print(text)
    result = {"environment": env, "args": {k: v for k, v in vars(args).items()
                                           if k != "from_json"},
              "summary": summary, "rows": rows}
    write_results(f"search_efficiency_{args.task}", result, text, Path(args.results), indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
