"""MAML meta-training throughput: autometa against its peers and a hand-written reference.

Second-order MAML meta-steps (inner SGD, Adam meta-update, lr 1e-3), in tasks per second,
on two workloads:

* ``sinusoid``: the MAML paper's 1-40-40-1 ReLU MLP (autometa's ``mlp`` source, hidden 40,
  2 layers), meta-batch 25, 10 shots, 10 queries, inner lr 0.01;
* ``conv4``: autometa's ``conv4`` source (64 channels) on 5-way 1-shot 15-query episodes of
  random 1x28x28 images, meta-batch 32, inner lr 0.4 (MAML's Omniglot setting), sampled
  from an :class:`autometa.episodes.ClassPool` of 1,000 classes x 20 images.

Contenders, each on its own copy of the same initial weights and on the same episodes:
autometa (the ``maml`` plugin's ``meta_step`` with strategy ``auto``, ``vmap`` and
``loop``), a hand-written torch.func reference (``functional_call`` + ``grad``, episodes
vmapped or looped), higher (``innerloop_ctx``), TorchOpt (``MetaSGD`` and its functional
``sgd``), learn2learn (``MAML.clone``/``adapt``). A peer that is not installed is listed as
such; see benchmarks/requirements.txt and benchmarks/README.md for the peers' set-up.

Method: every contender first computes the meta-gradient of one batch from the same
weights, in float64, on the first ``--check-tasks`` episodes of a batch, compared with the
looped reference's (a contender that disagrees voids its timing). Then repetitions are
interleaved: in each one every contender (in a rotated order) runs the same batches, and
the median tasks/s over repetitions is reported. Ratios are paired: the median over
repetitions of the two contenders' rates in the same repetition, so that a slow spell
of the machine hits both; "fastest peer" is the peer autometa compares worst with.
Timings on a shared machine are noisy; ratios within one run are what to compare.

``--prototypes`` adds proposed patches to autometa (``proto-*``, below), built on its real
toolkit and timed beside the unpatched plugin.

    python benchmarks/speed.py                      # both workloads, 1 and 5 inner steps
    python benchmarks/speed.py --models sinusoid --repeats 9
    python benchmarks/speed.py --prototypes proto-compile,proto-fused-adam
    python benchmarks/speed.py --co-tenant          # also beside a busy neighbour process

``--co-tenant`` times every workload twice in the same run: alone, then with a busy
neighbour process (a pure-Python loop, like ``yes > /dev/null``) holding a core, so the
ratios with and without a neighbour are measured side by side (rows ``<model>
(neighbour)``). Every machine has neighbours (data loading, other workers, a notebook, CI);
OpenMP threads that spin at barriers collapse beside one (issue 26). autometa is imported
before torch, as the ``autometa`` command does, so its thread policy
(:mod:`autometa.threads`) holds for every contender of the run.
    python benchmarks/speed.py --device cuda --name speed_cuda   # on a GPU

``--device`` puts every contender's model and episodes on that torch device (default the
CPU); on CUDA each clock read waits for the device (``torch.cuda.synchronize``).

Prints the tables and writes benchmarks/results/speed.json and speed.md (``--out``).
Its parts: workloads.py (the workloads, shared with memory.py and
inner_loop_strategies.py), speed_contenders.py, speed_prototypes.py, speed_measure.py and
speed_report.py; timing and reporting helpers shared by every benchmark in harness.py.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import autometa  # noqa: F401  before torch, as the autometa command: its thread policy

sys.path.insert(0, str(Path(__file__).resolve().parent))  # its parts, when imported

from harness import RESULTS, environment, print_and_write, stderr_log  # noqa: E402
from speed_contenders import ALL, missing_peer  # noqa: E402
from speed_measure import RTOL, run_workload, sampling_cost  # noqa: E402
from speed_prototypes import PROTOTYPE_SKIP, PROTOTYPES  # noqa: E402
from speed_report import report, summarise, summarise_prototypes  # noqa: E402
from workloads import META_LR, make_workload  # noqa: E402


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="sinusoid,conv4")
    parser.add_argument("--inner-steps", default="1,5")
    parser.add_argument("--contenders", default=",".join(ALL),
                        help=f"comma-separated subset of {','.join(ALL)}")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repetitions")
    parser.add_argument("--min-seconds", type=float, default=2.0,
                        help="a contender's repetition runs its meta-steps again until this "
                             "long (fast contenders)")
    parser.add_argument("--sinusoid-batches", type=int, default=20,
                        help="meta-steps per repetition on sinusoid")
    parser.add_argument("--conv4-batches", type=int, default=1,
                        help="meta-steps per repetition on conv4")
    parser.add_argument("--conv4-channels", type=int, default=64)
    parser.add_argument("--conv4-meta-batch", type=int, default=32)
    parser.add_argument("--conv4-side", type=int, default=28, help="image height and width")
    parser.add_argument("--pool-classes", type=int, default=1000,
                        help="classes (x20 images) in the conv4 episode pool")
    parser.add_argument("--fast-target", type=float, default=8.0,
                        help="sinusoid target: autometa / fastest peer (issue 26)")
    parser.add_argument("--conv4-target", type=float, default=1.5,
                        help="conv4 target: autometa / fastest peer (issue 26)")
    parser.add_argument("--prototypes", default="", metavar="LIST",
                        help=f"also time proposed patches: {','.join(PROTOTYPES)}")
    parser.add_argument("--check-tasks", type=int, default=4,
                        help="episodes in the float64 gradient check (0: skip it)")
    parser.add_argument("--co-tenant", action="store_true",
                        help="time every workload alone, then beside a busy neighbour process")
    parser.add_argument("--device", default="cpu",
                        help="torch device of every contender's model and episodes, e.g. cuda")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--name", default="speed", help="result file name")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)

    log = stderr_log(args.quiet)
    env = environment()
    wanted = [k for k in args.contenders.split(",") if k]
    wanted += [k for k in args.prototypes.split(",") if k and k not in wanted]
    unknown = [k for k in wanted if k not in ALL and k not in PROTOTYPES]
    if unknown:
        parser.error(f"unknown contender(s) {unknown}; choose from {ALL + list(PROTOTYPES)}")
    unavailable = {k: why for k in wanted if (why := missing_peer(k))}
    keys = [k for k in wanted if k not in unavailable]
    steps_list = [int(s) for s in args.inner_steps.split(",")]
    per_rep = {"sinusoid": args.sinusoid_batches, "conv4": args.conv4_batches}
    speed, grads, sampling, refused = [], [], [], []
    sampling_by = {}
    for name in args.models.split(","):
        run_keys = [k for k in keys if (k, name) not in PROTOTYPE_SKIP]
        work = make_workload(name, channels=args.conv4_channels,
                             meta_batch=args.conv4_meta_batch if name == "conv4" else None,
                             pool_classes=args.pool_classes, side=args.conv4_side,
                             device=args.device)
        for steps in steps_list:
            for label, beside in conditions(args.co_tenant):
                with beside() as neighbour:
                    res = run_workload(work, steps, run_keys, batches_per_rep=per_rep[name],
                                       repeats=args.repeats, check_tasks=args.check_tasks,
                                       log=log, min_seconds=args.min_seconds)
                    auto = next((r for r in res["speed"]
                                 if r["contender"] == "autometa-auto"), None)
                    cost = None if auto is None else \
                        sampling_cost(work, work.meta_batch / auto["tasks_per_s"])
                    if neighbour is not None:  # it ran the whole time, or this is void
                        assert neighbour.poll() is None, "the neighbour process ended early"
                model = f"{name}{label}"
                for part in ("speed", "gradients", "refused"):
                    for row in res[part]:
                        row["model"] = model
                speed += res["speed"]
                grads += res["gradients"]
                refused += res["refused"]
                if cost is not None:
                    sampling.append({"model": model, "inner_steps": steps, **cost})
                    sampling_by[(model, steps)] = cost
    result = {
        "environment": env,
        "settings": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                     "batches_per_rep": "/".join(str(per_rep[m]) for m in args.models.split(",")),
                     "batches_per_rep_by_model": ", ".join(
                         f"{m}: {per_rep[m]}" for m in args.models.split(",")),
                     "meta_lr": META_LR, "gradient_rtol": RTOL},
        "unavailable": unavailable,
        "refused": refused,
        "summary": summarise(speed, sampling_by, args.fast_target, args.conv4_target),
        "prototypes": summarise_prototypes(speed),
        "speed": speed,
        "gradients": grads,
        "sampling": sampling,
    }
    print_and_write(args.name, result, *report(result), args.out)
    return result


#: The neighbour: one core kept busy by a pure-Python loop that ends by itself once its
#: parent is gone (or after an hour), should the benchmark die without stopping it.
BUSY_LOOP = ("import os, time\n"
             "parent, end = os.getppid(), time.monotonic() + 3600\n"
             "while time.monotonic() < end and os.getppid() == parent:\n"
             "    pass\n")


def conditions(co_tenant: bool) -> list[tuple[str, Any]]:
    """The conditions each workload is timed under: alone, and with ``co_tenant`` beside a
    busy neighbour (the label its rows' model names get)."""
    alone = [("", contextlib.nullcontext)]
    return alone + [(" (neighbour)", busy_neighbour)] if co_tenant else alone


@contextlib.contextmanager
def busy_neighbour() -> Iterator[subprocess.Popen[bytes]]:
    """A busy process beside the block (one core's worth of load), stopped after it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "GOMP_"))}
    process = subprocess.Popen([sys.executable, "-c", BUSY_LOOP], env=env)
    try:
        yield process
    finally:
        process.kill()
        process.wait()


if __name__ == "__main__":
    main()
