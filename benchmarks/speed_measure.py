"""The measurements of speed.py: meta-gradient agreement, interleaved timing, sampling cost.

:func:`run_workload` does all three for one workload and inner-step count: it checks each
contender's float64 meta-gradient against the looped reference's (:func:`check_gradients`),
times the contenders in interleaved repetitions (:func:`time_contenders`), and the caller
sets the cost of sampling episodes against a meta-step (:func:`sampling_cost`). On a CUDA
workload every clock read waits for the device's queued work first (``harness.synchronizer``).
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from harness import interleave, synchronizer
from speed_contenders import PEERS, Autometa, Contender, Reference
from speed_prototypes import PROTOTYPES
from torch import nn
from workloads import Workload, make_autometa

from autometa import Episodes

#: In float64, a contender's meta-gradient must match the reference's to this relative
#: tolerance (max |g - g_ref| <= RTOL * max |g_ref|, over all parameters).
RTOL = 1e-9


def make_contender(key: str, model: nn.Module, work: Workload, steps: int) -> Contender:
    kind, _, strategy = key.partition("-")
    if kind == "autometa":
        return Autometa(model, work, steps, strategy)
    if kind == "reference":
        return Reference(model, work, steps, strategy)
    if key in PROTOTYPES:
        return PROTOTYPES[key](model, work, steps)
    return PEERS[key][1](model, work, steps)


def as_float64(batch: Episodes) -> Episodes:
    return Episodes(*(t.double() if t.is_floating_point() else t for t in
                      (batch.support_x, batch.support_y, batch.query_x, batch.query_y)))


def refusal(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:160]


def check_gradients(model: nn.Module, work: Workload, steps: int, batch: Episodes,
                    keys: Sequence[str]) -> list[dict[str, Any]]:
    """Each contender's meta-gradient on ``batch`` from the same weights, all in float64.

    float64 leaves only implementation differences: in float32, rounding flips a few ReLU
    and max-pool decisions of the conv4 (random inputs), which moves the meta-gradient by
    ~1e-3 relative in every implementation alike and would hide a real disagreement.
    """
    model64, batch64 = copy.deepcopy(model).double(), as_float64(batch)
    reference = Reference(model64, work, steps, "loop")
    reference.accumulate(batch64)
    truth = reference.meta_gradient()
    scale = float(truth.abs().max())
    rows = []
    for key in keys:
        try:
            contender = make_contender(key, model64, work, steps)
            contender.step(batch64)
        except Exception as exc:  # e.g. autometa refusing vmap through BatchNorm
            rows.append({"model": work.name, "inner_steps": steps, "contender": key,
                         "strategy": "–", "max_rel_error": math.nan, "agrees": None,
                         "error": refusal(exc)})
            continue
        err = float((contender.meta_gradient() - truth).abs().max()) / scale
        strategy = (contender.resolved_strategy() if isinstance(contender, Autometa)
                    else contender.strategy)
        rows.append({"model": work.name, "inner_steps": steps, "contender": key,
                     "strategy": strategy, "max_rel_error": err, "agrees": err <= RTOL})
    return rows


def time_contenders(contenders: dict[str, Contender], batches: Sequence[Episodes],
                    repeats: int, log: Callable[[str], None], warmup: dict[str, float],
                    refused: dict[str, str], min_seconds: float = 0.0,
                    sync: Callable[[], None] = lambda: None) -> dict[str, list[float]]:
    """Tasks per second of each contender per repetition, repetitions interleaved.

    In a repetition a contender runs ``batches`` once, and again until ``min_seconds`` have
    passed (``harness.interleave``, in a rotated order). ``warmup`` receives the seconds of
    each contender's first meta-step; ``refused`` the error of a contender whose first step
    raised (it is then left out). ``sync`` runs before every clock read (CUDA)."""
    for key in list(contenders):  # warm-up: one-off costs ('auto' probe, compilation)
        sync()
        start = time.perf_counter()
        try:
            contenders[key].step(batches[0])
            sync()
        except Exception as exc:  # e.g. autometa refusing vmap through BatchNorm
            refused[key] = refusal(exc)
            del contenders[key]
            continue
        warmup[key] = time.perf_counter() - start

    def progress(rep: int, rates: dict[str, list[float]]) -> None:
        log(f"  repetition {rep + 1}/{repeats}: " +
            ", ".join(f"{k} {r[-1]:.0f}" for k, r in rates.items()))

    return interleave({k: c.step for k, c in contenders.items()}, batches, repeats,
                      min_seconds=min_seconds, after=progress, sync=sync)


def sampling_cost(work: Workload, step_seconds: float, calls: int = 30) -> dict[str, Any]:
    """Median time to sample one meta-batch of episodes, against a meta-step."""
    g = torch.Generator(work.device).manual_seed(1)
    sync = synchronizer(work.device)
    work.task.sample(work.meta_batch, g)
    times = []
    for _ in range(calls):
        sync()
        start = time.perf_counter()
        work.task.sample(work.meta_batch, g)
        sync()
        times.append(time.perf_counter() - start)
    sample = statistics.median(times)
    return {"sample_ms": 1e3 * sample, "meta_step_ms": 1e3 * step_seconds,
            "percent_of_step": 100 * sample / step_seconds}


def run_workload(work: Workload, steps: int, keys: Sequence[str], *, batches_per_rep: int,
                 repeats: int, check_tasks: int, log: Callable[[str], None],
                 min_seconds: float = 0.0) -> dict[str, Any]:
    model = make_autometa(work, steps, "loop").model  # the shared initial weights
    batches = work.batches(batches_per_rep, seed=steps)
    log(f"{work.name}, {steps} inner step(s): checking meta-gradients")
    grads = (check_gradients(model, work, steps, batches[0][:check_tasks], keys)
             if check_tasks else [])
    log(f"{work.name}, {steps} inner step(s): timing {', '.join(keys)}")
    contenders = {k: make_contender(k, model, work, steps) for k in keys}
    warmup: dict[str, float] = {}
    refused: dict[str, str] = {}
    rates = time_contenders(contenders, batches, repeats, log, warmup, refused,
                            min_seconds, synchronizer(work.device))
    disagree = {g["contender"] for g in grads if g["agrees"] is False}
    speed = []
    for key in [k for k in keys if k in contenders]:
        c = contenders[key]
        strategy = c.resolved_strategy() if isinstance(c, Autometa) else c.strategy
        if strategy.startswith("auto→") and grads:
            # 'auto' ran the strategy it chose: it is as right as that strategy is.
            chosen = strategy.rsplit("→", 1)[-1]
            (disagree.add if f"autometa-{chosen}" in disagree else disagree.discard)(key)
        speed.append({"model": work.name, "inner_steps": steps, "contender": key,
                      "strategy": strategy, "tasks_per_s": statistics.median(rates[key]),
                      "min": min(rates[key]), "max": max(rates[key]), "runs": rates[key],
                      "first_step_s": warmup[key], "void": key in disagree})
    return {"speed": speed, "gradients": grads,
            "refused": [{"model": work.name, "inner_steps": steps, "contender": k, "error": e}
                        for k, e in refused.items()]}
