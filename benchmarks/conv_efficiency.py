"""How close a conv4 MAML meta-step on this CPU comes to the CPU's matmul peak.

The fraction is the meta-step's achieved GFLOP/s over a large float32 ``torch.mm``'s, both
measured in the same run with the same intra-op threads, interleaved (a slow spell of a
shared machine hits both). The meta-step's FLOPs are those ``torch.utils.flop_counter``'s
``FlopCounterMode`` counts in one second-order meta-step (convolutions and matmuls, forward
and every backward; BatchNorm, ReLU and pooling count nothing), on speed.py's conv4
workload (64 channels, 5-way 1-shot 15-query 1x28x28 episodes, meta-batch 32, inner lr
0.4). Contenders: autometa's ``maml`` plugin as it is (``autometa``) and on the conv4
plugin's previous block layout (``plain``: NCHW, ReLU before max-pool;
speed_prototypes.ProtoConv4Plain), on the same weights and batches.

    python benchmarks/conv_efficiency.py --inner-steps 1,5

Writes benchmarks/results/conv_efficiency.json and .md (``--name``, ``--out``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))



def matmul_gflops(n: int, min_seconds: float) -> float:
    """GFLOP/s of float32 ``torch.mm`` of two n x n matrices (2 n^3 FLOPs each)."""
    import torch

    a, b = torch.rand(n, n), torch.rand(n, n)
    torch.mm(a, b)
    start, done = time.perf_counter(), 0
    while (elapsed := time.perf_counter() - start) < min_seconds or not done:
        torch.mm(a, b)
        done += 1
    return 2 * n**3 * done / elapsed / 1e9


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    import torch
    from harness import (
        RESULTS,
        environment,
        interleave,
        markdown_table,
        paired_ratio,
        print_and_write,
        text_table,
    )
    from speed_contenders import Autometa
    from speed_prototypes import ProtoConv4Plain
    from torch.utils.flop_counter import FlopCounterMode
    from workloads import make_autometa, make_workload

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inner-steps", default="1,5")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--min-seconds", type=float, default=3.0)
    parser.add_argument("--matmul-size", type=int, default=2048)
    parser.add_argument("--conv4-channels", type=int, default=64)
    parser.add_argument("--conv4-meta-batch", type=int, default=32)
    parser.add_argument("--conv4-side", type=int, default=28, help="image height and width")
    parser.add_argument("--pool-classes", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--name", default="conv_efficiency")
    args = parser.parse_args(argv)
    env = environment()
    threads = torch.get_num_threads()
    work = make_workload("conv4", channels=args.conv4_channels,
                         meta_batch=args.conv4_meta_batch, side=args.conv4_side,
                         pool_classes=args.pool_classes)
    batches = work.batches(1)
    rows = []
    for steps in (int(s) for s in args.inner_steps.split(",")):
        model = make_autometa(work, steps, "auto").model
        contenders = {"autometa": Autometa(model, work, steps, "auto"),
                      "plain": ProtoConv4Plain(model, work, steps)}
        flops = {}
        torch.set_num_threads(1)  # one thread: every kernel runs where the counter sees it
        for key, c in contenders.items():
            with FlopCounterMode(display=False) as counter:
                c.step(batches[0])
            flops[key] = counter.get_total_flops()
        torch.set_num_threads(threads)
        for c in contenders.values():
            c.step(batches[0])  # warm-up
        tasks = len(batches[0])

        steps_fns: dict[str, Any] = {k: c.step for k, c in contenders.items()}
        peak: list[float] = []

        def measure_peak(_rep: int, _rates: Any, peak: list[float] = peak) -> None:
            peak.append(matmul_gflops(args.matmul_size, args.min_seconds))

        rates = interleave(steps_fns, batches, args.repeats, min_seconds=args.min_seconds,
                           after=measure_peak)
        for key in contenders:
            gflops = [r / tasks * flops[key] / 1e9 for r in rates[key]]
            rows.append({"inner_steps": steps, "contender": key,
                         "gflop_per_step": flops[key] / 1e9,
                         "tasks_per_s": statistics.median(rates[key]),
                         "gflops": statistics.median(gflops),
                         "matmul_gflops": statistics.median(peak),
                         "fraction_of_peak": paired_ratio(gflops, peak),
                         "vs_plain": paired_ratio(rates[key], rates["plain"]),
                         "runs": rates[key], "peak_runs": peak})
    headers = ["inner steps", "contender", "GFLOP / meta-step", "tasks/s", "GFLOP/s",
               "matmul GFLOP/s", "fraction of peak", "/ plain"]
    table = [[r["inner_steps"], r["contender"], f"{r['gflop_per_step']:.1f}",
              f"{r['tasks_per_s']:.2f}", f"{r['gflops']:.1f}", f"{r['matmul_gflops']:.1f}",
              f"{r['fraction_of_peak']:.2f}", f"{r['vs_plain']:.2f}x"] for r in rows]
    result = {"environment": env, "settings": {**vars(args), "out": str(args.out),
                                               "threads": threads}, "rows": rows}
    head = (f"conv4 second-order MAML meta-step against {args.matmul_size}^2 float32 "
            f"torch.mm, {threads} threads; load average at start "
            f"{env.get('load_average_1m')}\n")
    print_and_write(args.name, result, head + text_table(headers, table),
                    "# conv4 meta-step against the matmul peak\n\n" + head + "\n"
                    + markdown_table(headers, table) + "\n", args.out)
    return result


if __name__ == "__main__":
    main()
