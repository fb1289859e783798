"""Sinusoid regression at the MAML paper's scale: post-adaptation test MSE with a 95% CI.

The setting of Finn et al. (2017, section 5.1) and Li et al. (2017, Meta-SGD, Table 1):
10-shot regression of ``A sin(x - phase)``, the 1-40-40-1 ReLU MLP (autometa's ``mlp``
source), one inner SGD step with alpha = 0.01, meta-batch 25 tasks, Adam meta-lr 1e-3, up to
70,000 meta-steps. Each algorithm is looked up by its registered name through
``autometa.create_host()`` and trained with the engine's own ``build`` / ``meta_train``;
the trained model is adapted to each of the task's 600 fixed meta-test episodes (10 support
points, 100 query points) and scored with ``autometa.metrics.mean_ci95`` (Student's t).

Algorithms not registered or not importable yet are reported as "not available" and
skipped. Hyperparameters an algorithm's constructor does not take are dropped (and listed).

    python benchmarks/sinusoid_accuracy.py --steps 70000            # the paper's scale
    python benchmarks/sinusoid_accuracy.py --steps 2000 --algorithms maml,finetune

Prints a table and writes benchmarks/results/sinusoid_accuracy.json and .md (``--out``).
"""

from __future__ import annotations

import argparse
import inspect
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import (  # noqa: E402  (the shared report helpers)
    RESULTS,
    describe_environment,
    environment,
    markdown_table,
    print_and_write,
    stderr_log,
    text_table,
)

from autometa import create_host  # noqa: E402
from autometa.errors import AutometaError  # noqa: E402
from autometa.metrics import mean_ci95  # noqa: E402
from autometa.study.trials import TrialPlan  # noqa: E402
from autometa.trial import build, evaluate, meta_train  # noqa: E402

#: label -> (registered name, hyperparameters). The paper's settings where they apply.
PAPER = {"inner_lr": 0.01, "inner_steps": 1, "meta_lr": 1e-3, "meta_batch_size": 25}
ALGORITHMS: dict[str, tuple[str, dict[str, Any]]] = {
    "maml": ("maml", {**PAPER, "first_order": False}),
    "fomaml": ("maml", {**PAPER, "first_order": True}),
    "metasgd": ("metasgd", dict(PAPER)),
    # Reptile's own sine-wave settings (Nichol et al. 2018, its released sine demo): inner
    # SGD 0.02 for 5 steps (one epoch of 10-point minibatches there; full batches of the 20
    # support + query points here), outer step 0.1, 32 SGD steps at test. One inner step
    # would make Reptile plain joint training.
    "reptile": ("reptile", {"inner_lr": 0.02, "inner_steps": 5, "outer_lr": 0.1,
                            "meta_batch_size": 5, "eval_steps": 32}),
    # The paper's "pretrained" baseline: supervised on pooled tasks, then SGD at test time.
    "finetune": ("finetune", {"lr": 1e-3, "batch_tasks": 25, "finetune_lr": 0.01,
                              "finetune": "all", "finetune_steps": 10, "momentum": 0.0,
                              "weight_decay": 0.0}),
}
#: Li et al. 2017 (Meta-SGD), Table 1, 10-shot sinusoid regression: MSE and 95% CI.
PUBLISHED = {"maml": (0.77, 0.11), "metasgd": (0.53, 0.09)}


def accepted(cls: type, params: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The hyperparameters ``cls`` takes, and the names of those it does not."""
    names = inspect.signature(cls.__init__).parameters
    kept = {k: v for k, v in params.items() if k in names}
    return kept, sorted(set(params) - set(kept))


def run_one(label: str, host: Any, task: Any, steps: int, seed: int,
            log: Any) -> dict[str, Any]:
    name, params = ALGORITHMS[label]
    row: dict[str, Any] = {"algorithm": label, "registered_name": name, "meta_steps": steps}
    try:
        cls = host.get("algorithm", name).load()
    except AutometaError as exc:  # not registered, or its module does not import
        row.update(status="not available", reason=str(exc).splitlines()[0])
        log(f"{label}: not available ({row['reason']})")
        return row
    kept, dropped = accepted(cls, params)
    row.update(params=kept, dropped_params=dropped)
    start = time.perf_counter()
    try:
        algorithm = build(host, task, TrialPlan(name, "mlp", kept, {"hidden": 40, "layers": 2}),
                          seed=seed)
        curve: list[tuple[int, float]] = []
        eval_every = max(steps // 10, 1)
        meta_train(algorithm, task, meta_steps=steps, eval_every=eval_every,
                   generator=torch.Generator().manual_seed(seed),
                   on_eval=lambda step, score: (curve.append((step, score)),
                                                log(f"{label}: step {step}, meta-val MSE "
                                                    f"{score:.3f}")))
        train_s = time.perf_counter() - start
        scores = evaluate(algorithm, task.meta_test(), task)  # (600,) per-episode MSE
    except (AutometaError, NotImplementedError, TypeError) as exc:
        row.update(status="failed", reason=f"{type(exc).__name__}: {exc}".splitlines()[0])
        log(f"{label}: failed ({row['reason']})")
        return row
    mean, half = mean_ci95(scores)
    row.update(status="ok", test_mse=mean, ci95=half, test_episodes=len(scores),
               meta_val_curve=curve, train_seconds=train_s,
               total_seconds=time.perf_counter() - start)
    log(f"{label}: test MSE {mean:.3f} ± {half:.3f} ({train_s:.0f} s)")
    return row


def report(result: dict[str, Any]) -> tuple[str, str]:
    headers = ["algorithm", "meta-steps", f"test MSE ± 95% CI ({result['test_episodes']} "
               "episodes)", "published (Meta-SGD, Table 1)", "train wall s", "status"]
    rows = []
    for r in result["rows"]:
        pub = PUBLISHED.get(r["algorithm"])
        rows.append([
            r["algorithm"], r["meta_steps"],
            f"{r['test_mse']:.3f} ± {r['ci95']:.3f}" if r["status"] == "ok" else "–",
            f"{pub[0]:.2f} ± {pub[1]:.2f}" if pub else "–",
            f"{r['train_seconds']:.0f}" if r["status"] == "ok" else "–",
            r["status"] if r["status"] == "ok" else f"{r['status']}: {r['reason']}",
        ])
    env = result["environment"]
    setting = ("10-shot sinusoid, MLP 1-40-40-1, 1 inner SGD step (alpha 0.01; Meta-SGD: "
               "its learned rates start at 0.01), meta-batch 25, Adam meta-lr 1e-3 (MAML, "
               "FOMAML, Meta-SGD); Reptile: its paper's sine settings (inner SGD 0.02 x 5 "
               "steps on support + query, outer step 0.1, meta-batch 5, 32 SGD steps at "
               "test); fine-tune: Adam 1e-3 on 25 pooled tasks per step, then 10 plain SGD "
               "steps (lr 0.01) on all parameters on each support set. Seed "
               f"{result['seed']}, {result['threads']} torch thread(s).")
    dropped = [f"{r['algorithm']}: {', '.join(r['dropped_params'])}"
               for r in result["rows"] if r.get("dropped_params")]
    text = "\n".join([f"Environment: {describe_environment(env)}", f"Setting: {setting}", "",
                      text_table(headers, rows)]
                     + ([f"Not taken by the constructor: {'; '.join(dropped)}"] if dropped else []))
    md = "\n".join(["# Sinusoid regression, 10 shots", "",
                    f"**Environment.** {describe_environment(env)}", "",
                    f"**Setting.** {setting}", "", markdown_table(headers, rows), ""]
                   + ([f"Not taken by the constructor: {'; '.join(dropped)}.", ""]
                      if dropped else [])
                   + [f"Command: `{env['command']}`", ""])
    return text, md


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=70_000, help="meta-steps per algorithm")
    parser.add_argument("--algorithms", default=",".join(ALGORITHMS),
                        help=f"comma-separated subset of {','.join(ALGORITHMS)}")
    parser.add_argument("--test-episodes", type=int, default=600)
    parser.add_argument("--val-episodes", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--name", default="sinusoid_accuracy", help="result file name")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    labels = [a for a in args.algorithms.split(",") if a]
    if unknown := [a for a in labels if a not in ALGORITHMS]:
        parser.error(f"unknown algorithm(s) {unknown}; choose from {list(ALGORITHMS)}")
    if args.threads:
        torch.set_num_threads(args.threads)

    log = stderr_log(args.quiet)
    env = environment()
    host = create_host()
    task = host.get("task", "sinusoid").load()(
        shots=10, queries=10, eval_queries=100, val_episodes=args.val_episodes,
        test_episodes=args.test_episodes, seed=args.seed)
    rows = [run_one(label, host, task, args.steps, args.seed, log) for label in labels]
    result = {"environment": env, "seed": args.seed, "threads": torch.get_num_threads(),
              "test_episodes": args.test_episodes, "published": PUBLISHED, "rows": rows}
    print_and_write(args.name, result, *report(result), args.out)
    return result


if __name__ == "__main__":
    main()
