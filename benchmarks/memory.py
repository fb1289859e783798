"""Peak memory of one MAML meta-step: 1, 5 and 10 inner steps, second and first order.

The two workloads of speed.py (the sinusoid MLP 1-40-40-1 at meta-batch 25; conv4 with 64
channels on 5-way 1-shot 15-query 28x28 episodes at meta-batch 32), through autometa's
``maml`` plugin with strategy ``auto``, ``vmap`` and ``loop`` (which back-propagates each
task as soon as its query loss is known, ``autometa.inner_loop.meta_backward``), beside
``stacked-loop``: the same loop with every task's prediction stacked and one backward, so
that every task's graph is alive at once (what ``loop`` did before meta_backward).

Method (CPU), two measures, each configuration in a fresh Python process:

1. **RSS**: after building the task, the episodes and the algorithm, and one warm-up
   meta-step on a single task (one-off imports and Adam's state), the process reads its
   resident set size (/proc/self/statm) and runs ONE meta-step on the full meta-batch; the
   result is the process's peak RSS (``getrusage(RUSAGE_SELF).ru_maxrss``) minus that RSS.
   It counts allocator slack, but misses memory the step reuses from what earlier steps
   freed, and its resolution is ~0.5 MB (kernel RSS counters). Flagged "(≤)" when the step
   did not raise the high-water mark. With ``auto``, this step includes autometa's one-off
   strategy probe (two vmapped and two looped meta-gradients), as every trial's first
   step does.
2. **tensors**: a second meta-step while a thread samples glibc's ``mallinfo2`` every
   0.2 ms; the high point of the bytes malloc had handed out (torch's CPU allocator is
   malloc), above what it held before the step: activations, autograd graphs, gradients,
   every tensor of every thread (the loop's worker threads too). Blind to allocator slack.
   With ``auto`` it is the chosen strategy's step (the probe ran in step 1).

    python benchmarks/memory.py                     # both models, 1/5/10 steps, both orders
    python benchmarks/memory.py --models sinusoid --inner-steps 1,5

Prints a table and writes benchmarks/results/memory.json and memory.md (``--out``).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import resource
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

CONTENDERS = ["autometa-auto", "autometa-vmap", "autometa-loop", "stacked-loop"]


def rss_kb() -> int:
    """Current resident set size of this process, in KiB (Linux)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize() // 1024


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Measure one configuration in this (fresh) process."""
    import torch
    from workloads import make_autometa, make_workload

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    # A small pool: the step's memory does not depend on it, the baseline does.
    work = make_workload(spec["model"], channels=spec["channels"],
                         meta_batch=spec["meta_batch"], pool_classes=100)
    batch = work.batches(1)[0]
    strategy = spec["contender"].rsplit("-", 1)[-1]
    algorithm = make_autometa(work, spec["steps"], strategy, first_order=spec["first_order"])

    def step(episodes: Any) -> None:
        if spec["contender"] == "stacked-loop":
            stacked_loop_step(algorithm, episodes)
        else:
            algorithm.meta_step(episodes)

    # One-off costs out of the measurement: the first torch.func call imports ~800 modules
    # (~1 s, tens of MB), and Adam allocates its state on its first step.
    step(batch[:1])
    gc.collect()
    high_water_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    baseline = rss_kb()
    start = time.perf_counter()
    step(batch)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    from autometa.inner_loop import choose_strategy

    chosen = ([choose_strategy(algorithm.model, meta_gradient=True,
                               first_order=spec["first_order"])]
              if spec["contender"] == "autometa-auto" else [])
    return {**spec, "baseline_mb": baseline / 1024, "peak_mb": peak / 1024,
            "step_peak_mb": (peak - baseline) / 1024, "raised_high_water": peak > high_water_before,
            "seconds": seconds, "auto_chose": "/".join(chosen) or None,
            "tensor_peak_mb": tensor_peak_mb(lambda: step(batch)) if spec["tensors"] else None}


def stacked_loop_step(alg: Any, episodes: Any) -> float:
    """A MAML meta-step whose loop keeps every task's graph alive until one backward."""
    from autometa.inner_loop import adapt_episodes

    pred = adapt_episodes(alg.model, episodes, alg.task.loss, steps=alg.inner_steps,
                          lr=alg.inner_lr, first_order=alg.first_order, strategy="loop")
    loss = alg.task.loss(pred, episodes.query_y)
    alg.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    alg.optimizer.step()
    return loss.item()


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


def tensor_peak_mb(run: Any, every: float = 2e-4) -> float | None:
    """Peak of the bytes malloc had handed out during ``run()``, above what it held before,
    in MiB: every thread's tensors, autograd graphs and gradients (torch's CPU allocator is
    malloc). A thread samples glibc's ``mallinfo2`` (bytes in use in every arena plus
    mmap-ed blocks) every ``every`` seconds. None off glibc.

    torch.profiler's allocation events, used before, see only the thread that started the
    profiler, so they missed the loop's worker threads; on one thread the two agree
    (second-order conv4, 1 and 5 inner steps: 64.0 / 64.3 MB and 90.1 / 90.0 MB).
    """
    try:
        mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return None
    mallinfo2.restype = _MallInfo2

    def in_use() -> int:
        info = mallinfo2()
        return int(info.uordblks + info.hblkhd)

    before = peak = in_use()
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, in_use())
            done.wait(every)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        run()
    finally:
        done.set()
        sampler.join()
    return (max(peak, in_use()) - before) / 2**20


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Run :func:`worker` in a fresh interpreter and return its result."""
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)],
                          capture_output=True, text=True)
    last = (proc.stdout.strip().splitlines() or [""])[-1]
    if proc.returncode != 0 and not last.startswith("{"):
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {**spec, "error": f"exit {proc.returncode}: {tail}"}
    return json.loads(last)


def report(result: dict[str, Any]) -> tuple[str, str]:
    from harness import describe_environment, markdown_table, text_table

    rows_by: dict[tuple, dict[str, dict[str, Any]]] = {}
    for r in result["rows"]:
        key = (r["model"], r["steps"], "first" if r["first_order"] else "second")
        rows_by.setdefault(key, {})[r["contender"]] = r
    contenders = [c for c in CONTENDERS if any(c in v for v in rows_by.values())]

    def cell(r: dict[str, Any] | None) -> str:
        if r is None:
            return "–"
        if "error" in r:
            return f"error ({r['error'][:60]})"
        tensors = r.get("tensor_peak_mb")
        mark = "" if r["raised_high_water"] else " (≤)"
        return (f"{'–' if tensors is None else f'{tensors:,.1f}'} / "
                f"{r['step_peak_mb']:,.1f}{mark} / {r['seconds']:.2f} s")

    headers = ["model", "inner steps", "order", *contenders, "auto chose"]
    rows = []
    for (model, steps, order), by in rows_by.items():
        auto = by.get("autometa-auto", {})
        rows.append([model, steps, order, *(cell(by.get(c)) for c in contenders),
                     auto.get("auto_chose") or "–"])
    env = result["environment"]
    method = ("Each cell: tensor peak MB / RSS peak MB / wall s of the RSS step. Tensor "
              "peak: the high point of the bytes malloc had handed out (all threads) above "
              "what it held before, during a second step (mallinfo2 sampled every 0.2 ms). "
              "RSS peak: getrusage ru_maxrss after one meta-step minus the RSS just before "
              "it, after a one-task warm-up step; '(≤)' when the step did not raise the "
              "high-water mark. Each configuration in a fresh "
              "process. 'auto': the RSS step includes the one-off strategy probe, the tensor "
              "step is the chosen strategy's. autometa-loop back-propagates each task as "
              "soon as its loss is known; stacked-loop keeps every task's graph until one "
              "backward (autometa's loop before meta_backward).")
    text = "\n".join([f"Environment: {describe_environment(env)}", f"Method: {method}", "",
                      text_table(headers, rows)])
    md = "\n".join(["# Peak memory of a MAML meta-step", "",
                    f"**Environment.** {describe_environment(env)}", "",
                    f"**Method.** {method}", "", markdown_table(headers, rows), "",
                    f"Command: `{env['command']}`", ""])
    return text, md


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="sinusoid,conv4")
    parser.add_argument("--inner-steps", default="1,5,10")
    parser.add_argument("--orders", default="second,first")
    parser.add_argument("--contenders", default=",".join(CONTENDERS))
    parser.add_argument("--conv4-channels", type=int, default=64)
    parser.add_argument("--conv4-meta-batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None, help="torch threads per worker")
    parser.add_argument("--no-tensors", action="store_true",
                        help="skip the second (sampled) meta-step")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))), flush=True)
        os._exit(0)  # skip finalization: nothing to clean up, and it takes seconds

    from harness import environment, print_and_write

    contenders = [c for c in args.contenders.split(",") if c]
    if unknown := [c for c in contenders if c not in CONTENDERS]:
        parser.error(f"unknown contender(s) {unknown}; choose from {CONTENDERS}")
    env = environment()
    rows = []
    for model in args.models.split(","):
        for steps in (int(s) for s in args.inner_steps.split(",")):
            for order in args.orders.split(","):
                for contender in contenders:
                    spec = {"model": model, "steps": steps, "first_order": order == "first",
                            "contender": contender, "channels": args.conv4_channels,
                            "meta_batch": args.conv4_meta_batch if model == "conv4" else 25,
                            "threads": args.threads, "tensors": not args.no_tensors}
                    row = measure(spec)
                    rows.append(row)
                    if not args.quiet:
                        what = row.get("error") or f"{row['step_peak_mb']:.1f} MB"
                        print(f"{model} {steps} {order} {contender}: {what}",
                              file=sys.stderr, flush=True)
    result = {"environment": env, "method": "ru_maxrss delta over pre-step RSS, fresh process",
              "rows": rows}
    print_and_write("memory", result, *report(result), args.out)
    return result


if __name__ == "__main__":
    main()
