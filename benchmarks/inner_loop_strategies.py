"""Meta-training throughput of the inner-loop strategies, side by side in one run.

MAML (second and first order) meta-steps on the sinusoid task with the MAML paper's
1-40-40-1 MLP, meta-batch 25, 10 shots, 10 queries: tasks per second with the episodes
vmapped through torch.func versus looped one task at a time, and the ratio. Ratios, not
absolute times, are what to compare across machines.

    python benchmarks/inner_loop_strategies.py [--steps 50] [--repeats 5]

Prints a table and writes benchmarks/results/inner_loop_strategies.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from autometa import create_host
from autometa.trial import TrialPlan, build


def tasks_per_second(strategy: str, first_order: bool, inner_steps: int, steps: int,
                     repeats: int) -> float:
    host = create_host()
    task = host.get("task", "sinusoid").load()(val_episodes=1, test_episodes=1)
    plan = TrialPlan("maml", "mlp",
                     {"strategy": strategy, "first_order": first_order,
                      "inner_steps": inner_steps, "meta_batch_size": 25},
                     {"hidden": 40, "layers": 2})
    algorithm = build(host, task, plan, seed=0)
    g = torch.Generator().manual_seed(0)
    batches = [task.sample(25, g) for _ in range(steps)]
    algorithm.meta_step(batches[0])  # warm-up
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for batch in batches:
            algorithm.meta_step(batch)
        rates.append(25 * steps / (time.perf_counter() - start))
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rows = []
    for first_order in (False, True):
        for inner_steps in (1, 5):
            rate = {s: tasks_per_second(s, first_order, inner_steps, args.steps, args.repeats)
                    for s in ("vmap", "loop")}
            rows.append({"order": "first" if first_order else "second",
                         "inner_steps": inner_steps, "vmap_tasks_per_s": rate["vmap"],
                         "loop_tasks_per_s": rate["loop"],
                         "vmap_over_loop": rate["vmap"] / rate["loop"]})
    print(f"MAML on sinusoid, MLP 1-40-40-1, meta-batch 25; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    print(f"{'order':<7}{'inner steps':>12}{'vmap tasks/s':>14}{'loop tasks/s':>14}"
          f"{'vmap/loop':>11}")
    for r in rows:
        print(f"{r['order']:<7}{r['inner_steps']:>12}{r['vmap_tasks_per_s']:>14.0f}"
              f"{r['loop_tasks_per_s']:>14.0f}{r['vmap_over_loop']:>10.2f}x")
    out = Path(__file__).parent / "results" / "inner_loop_strategies.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(),
                               "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
