"""vmap against loop in autometa's inner loop, and what the ``"auto"`` rule picks.

``strategy="auto"`` is a fixed rule (``autometa.inner_loop.choose_strategy``): the loop for
models with a convolution or BatchNorm layer (and wherever vmap is refused), vmap for the
others. This script measures both strategies on the standard workloads and says, for each,
whether the rule picked the faster one:

* ``sinusoid``: the MAML paper's 1-40-40-1 ReLU MLP (``mlp`` source, hidden 40, 2 layers),
  meta-batch 25, 10 shots, 10 queries, inner lr 0.01;
* ``conv4``: the ``conv4`` source (64 channels, BatchNorm without running statistics) on
  5-way 1-shot 15-query episodes of random 1x28x28 images, meta-batch 32, inner lr 0.4
  (``speed.py``'s workloads);
* ``sinusoid-bn`` (not run by default): the sinusoid MLP with a BatchNorm1d (batch
  statistics) after each hidden layer, which tells whether BatchNorm alone slows vmap.

Modes, each through the ``maml`` plugin as a trial builds it: ``second-order`` and
``first-order`` meta-gradients (``MAML.meta_step`` in training mode) and ``prediction``
(``MAML.adapt_and_predict`` in eval mode, as ``trial.evaluate`` calls it for meta-val and
meta-test: inner steps, no meta-gradient). Repetitions are interleaved (vmap, loop, then
loop, vmap, ...), each runs its batches again until ``--min-seconds`` have passed, and the
ratio is paired: the median over repetitions of vmap's tasks/s over the loop's in the same
repetition. Ratios, not absolute rates, are what to compare across machines.

    python benchmarks/inner_loop_strategies.py [--models sinusoid,conv4] [--threads 1]

Prints a table and writes benchmarks/results/inner_loop_strategies.json and .md (``--out``).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the workloads and harness

from harness import (  # noqa: E402
    RESULTS,
    environment,
    interleave,
    markdown_table,
    paired_ratio,
    ratio,
    stderr_log,
    text_table,
    write_results,
)
from workloads import META_LR, Workload, make_autometa, make_workload  # noqa: E402

from autometa import Backbone, create_host  # noqa: E402
from autometa.errors import ConfigError  # noqa: E402
from autometa.inner_loop import choose_strategy  # noqa: E402
from autometa.task import Episodes  # noqa: E402

MODES = ("second-order", "first-order", "prediction")
STRATEGIES = ("vmap", "loop")


def make_maml(work: Workload, inner_steps: int, strategy: str, first_order: bool) -> Any:
    """The ``maml`` plugin on the workload's model, built as a trial builds it."""
    if work.name != "sinusoid-bn":
        return make_autometa(work, inner_steps, strategy, first_order=first_order)
    torch.manual_seed(0)
    model = Backbone(nn.Sequential(
        nn.Flatten(), nn.Linear(1, 40), nn.BatchNorm1d(40, track_running_stats=False),
        nn.ReLU(), nn.Linear(40, 40), nn.BatchNorm1d(40, track_running_stats=False),
        nn.ReLU()), nn.Linear(40, 1))
    maml = create_host().get("algorithm", "maml").load()
    return maml(model, work.task, inner_lr=work.inner_lr, inner_steps=inner_steps,
                meta_lr=META_LR, meta_batch_size=work.meta_batch, first_order=first_order,
                strategy=strategy)


def workload(name: str, args: argparse.Namespace) -> Workload:
    if name == "sinusoid-bn":
        return dataclasses.replace(make_workload("sinusoid"), name=name, source="-")
    return make_workload(name, channels=args.conv4_channels,
                         meta_batch=args.conv4_meta_batch if name == "conv4" else None,
                         pool_classes=args.pool_classes, side=args.conv4_side)


def make_runner(work: Workload, mode: str, strategy: str, inner_steps: int,
                device: str) -> tuple[Callable[[Episodes], Any], str]:
    """One unit of work (a meta-step, or predictions on a batch) and the rule's choice."""
    algorithm = make_maml(work, inner_steps, strategy, first_order=mode == "first-order")
    algorithm.model.to(device)
    if mode == "prediction":
        algorithm.model.eval()  # as trial.evaluate does
        chosen = choose_strategy(algorithm.model, meta_gradient=False, first_order=True)

        def predict(batch: Episodes) -> Any:
            out = algorithm.adapt_and_predict(batch)
            if out.device.type == "cuda":
                torch.cuda.synchronize(out.device)
            return out

        return predict, chosen
    chosen = choose_strategy(algorithm.model, meta_gradient=True,
                             first_order=mode == "first-order")

    def step(batch: Episodes) -> Any:
        loss = algorithm.meta_step(batch)  # .item(): synchronises a GPU
        return loss

    return step, chosen


def measure(work: Workload, mode: str, inner_steps: int, *, batches: int, repeats: int,
            min_seconds: float, device: str, log: Callable[[str], None]) -> dict[str, Any]:
    """Tasks/s of both strategies in one mode, interleaved; the rule's choice."""
    data = [b.to(device) for b in work.batches(batches, seed=inner_steps)]
    runners: dict[str, Callable[[Episodes], Any]] = {}
    refused: dict[str, str] = {}
    chosen = "?"
    for strategy in STRATEGIES:
        run, chosen = make_runner(work, mode, strategy, inner_steps, device)
        try:
            run(data[0])  # warm-up: allocations, dispatch caches
            runners[strategy] = run
        except ConfigError as exc:  # vmap refused (second order through BatchNorm)
            refused[strategy] = str(exc)

    def progress(rep: int, rates: dict[str, list[float]]) -> None:
        log(f"  {work.name} {mode} {inner_steps} step(s), repetition {rep + 1}/{repeats}: "
            + ", ".join(f"{s} {r[-1]:.1f}" for s, r in rates.items()))

    # Two strategies rotated: vmap, loop, then loop, vmap, ...
    rates = interleave(runners, data, repeats, min_seconds=min_seconds, after=progress)
    median = {s: statistics.median(r) for s, r in rates.items()}
    if len(rates) == 2:
        vmap_over_loop: float | None = paired_ratio(rates["vmap"], rates["loop"])
        faster = "vmap" if vmap_over_loop > 1 else "loop"
    else:
        vmap_over_loop, faster = None, next(iter(rates))  # the only one allowed
    return {"model": work.name, "mode": mode, "inner_steps": inner_steps,
            "tasks_per_episode_batch": len(data[0]),
            "vmap_tasks_per_s": median.get("vmap"), "loop_tasks_per_s": median.get("loop"),
            "vmap_runs": rates.get("vmap"), "loop_runs": rates.get("loop"),
            "vmap_over_loop": vmap_over_loop, "faster": faster, "auto_picks": chosen,
            "auto_is_faster": chosen == faster, "refused": refused}


def _rate(x: float | None) -> str:
    return "refused" if x is None else f"{x:,.1f}" if x < 100 else f"{x:,.0f}"


def report(rows: Sequence[dict[str, Any]], env: dict[str, Any], device: str
           ) -> tuple[str, str]:
    headers = ["model", "mode", "inner steps", "vmap tasks/s", "loop tasks/s", "vmap/loop",
               "faster", "auto picks", "auto = faster"]
    body = [[r["model"], r["mode"], r["inner_steps"], _rate(r["vmap_tasks_per_s"]),
             _rate(r["loop_tasks_per_s"]),
             ratio(r["vmap_over_loop"]),
             r["faster"], r["auto_picks"], "yes" if r["auto_is_faster"] else "NO"]
            for r in rows]
    title = (f"{env['cpu']}, {env['cores']} cores, torch {env['versions']['torch']} "
             f"({env['torch_threads']} threads), device {device}, autometa "
             f"{env['autometa_commit']}, load average at start {env['load_average_1m']:.2f}, "
             f"{env['date']}")
    text = "\n".join([title, text_table(headers, body)])
    md = "\n".join(["# Inner-loop strategies: vmap against loop, and the auto rule", "",
                    title, "", markdown_table(headers, body), "",
                    "Tasks/s: median of interleaved repetitions; vmap/loop: paired ratio.",
                    "", f"Command: `{env['command']}`"])
    return text, md


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="sinusoid,conv4")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--inner-steps", default="1")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repetitions")
    parser.add_argument("--min-seconds", type=float, default=2.0,
                        help="each repetition runs its batches again until this long")
    parser.add_argument("--sinusoid-batches", type=int, default=20,
                        help="meta-batches per repetition on sinusoid")
    parser.add_argument("--conv4-batches", type=int, default=1,
                        help="meta-batches per repetition on conv4")
    parser.add_argument("--conv4-channels", type=int, default=64)
    parser.add_argument("--conv4-meta-batch", type=int, default=32)
    parser.add_argument("--conv4-side", type=int, default=28)
    parser.add_argument("--pool-classes", type=int, default=1000)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--name", default="inner_loop_strategies")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)

    log = stderr_log(args.quiet)
    if args.threads:
        torch.set_num_threads(args.threads)
    env = environment()
    rows = []
    for name in args.models.split(","):
        work = workload(name, args)
        batches = args.conv4_batches if name == "conv4" else args.sinusoid_batches
        for steps in (int(s) for s in args.inner_steps.split(",")):
            for mode in args.modes.split(","):
                rows.append(measure(work, mode, steps, batches=batches, repeats=args.repeats,
                                    min_seconds=args.min_seconds, device=args.device,
                                    log=log))
    text, md = report(rows, env, args.device)
    print(text)
    result = {"environment": env, "device": args.device,
              "settings": {k: str(v) if isinstance(v, Path) else v
                           for k, v in vars(args).items()},
              "rows": rows}
    for path in write_results(args.name, result, md, args.out):
        log(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
