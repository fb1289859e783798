"""The inner-loop toolkit shared by gradient-based meta-algorithms, on torch.func.

Parameters are handled functionally, as a ``{name: tensor}`` dict evaluated through
``torch.func.functional_call``. Adaptation is differentiable end to end: the meta-gradient
flows through the inner SGD steps (second order) unless ``first_order`` treats the inner
gradients as constants. Episodes are processed either all at once with ``torch.func.vmap``
(``"vmap"``) or one at a time (``"loop"``); both give the same values and gradients,
with one exception: PyTorch's vmap batching rule for the double backward of BatchNorm is
wrong (functorch issue #534), so a second-order meta-gradient through a BatchNorm layer in
training mode is computed with the loop ("auto") or refused ("vmap").
Which is faster depends on the model and the device (vmap was ~10x faster than the loop for
a small MLP on a 2-core CPU, ~3x slower for a conv4), so ``"auto"`` times both once per
model signature, episode shape and device, on a few of the tasks, and remembers the winner
for the process.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Hashable, Mapping
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from autometa.task import Episodes

log = logging.getLogger(__name__)

Params = dict[str, Tensor]
LossFn = Callable[[Tensor, Tensor], Tensor]
Strategy = Literal["auto", "vmap", "loop"]
#: A scalar step size, or one tensor per parameter (Meta-SGD's learned rates).
LearningRate = float | Tensor | Mapping[str, Tensor]


def parameters_of(model: nn.Module) -> Params:
    """The model's parameters as a dict of the live tensors (gradients reach the model)."""
    return dict(model.named_parameters())


def adapt(
    model: nn.Module,
    params: Params,
    x: Tensor,
    y: Tensor,
    loss_fn: LossFn,
    *,
    steps: int,
    lr: LearningRate,
    first_order: bool = False,
    adapt_only: Callable[[str], bool] | None = None,
) -> Params:
    """Run ``steps`` of SGD on one support set (x: (n, *input_shape)) and return new params.

    Args:
        adapt_only: if given, only names for which it returns True are updated (ANIL: the
            head); the others are left as they are and still carry their meta-gradient.
    """
    names = [n for n in params if adapt_only is None or adapt_only(n)]
    frozen = {n: p for n, p in params.items() if n not in names}

    def support_loss(fast: Params) -> Tensor:
        return loss_fn(functional_call(model, {**frozen, **fast}, (x,)), y)

    fast = {n: params[n] for n in names}
    for _ in range(steps):
        grads = grad(support_loss)(fast)
        if first_order:
            grads = {n: g.detach() for n, g in grads.items()}
        fast = {n: p - _lr(lr, n) * grads[n] for n, p in fast.items()}
    return {**frozen, **fast}


def _lr(lr: LearningRate, name: str) -> float | Tensor:
    return lr[name] if isinstance(lr, Mapping) else lr


def adapt_and_predict(
    model: nn.Module,
    params: Params,
    support_x: Tensor,
    support_y: Tensor,
    query_x: Tensor,
    loss_fn: LossFn,
    *,
    steps: int,
    lr: LearningRate,
    first_order: bool = False,
    adapt_only: Callable[[str], bool] | None = None,
    strategy: Strategy = "vmap",
) -> Tensor:
    """Adapt to each episode's support set and predict its query set.

    Shapes: support_x (tasks, n_s, *in), support_y (tasks, n_s[, out]), query_x (tasks,
    n_q, *in) -> (tasks, n_q, out). Differentiable w.r.t. ``params`` (and ``lr``).
    """

    def one(sx: Tensor, sy: Tensor, qx: Tensor) -> Tensor:
        fast = adapt(model, params, sx, sy, loss_fn, steps=steps, lr=lr,
                     first_order=first_order, adapt_only=adapt_only)
        return functional_call(model, fast, (qx,))

    def run(chosen: Strategy, tasks: int | None = None) -> Tensor:
        sx, sy, qx = support_x[:tasks], support_y[:tasks], query_x[:tasks]
        if chosen == "vmap":
            return vmap(one)(sx, sy, qx)
        return torch.stack([one(*t) for t in zip(sx, sy, qx, strict=True)])

    if torch.is_grad_enabled() and not first_order and _batch_norm_in_training(model):
        if strategy == "vmap":
            raise ValueError(
                "strategy 'vmap' gives wrong second-order meta-gradients through BatchNorm "
                "(PyTorch functorch issue #534); use 'loop' or 'auto', or first_order=True"
            )
        strategy = "loop"
    if strategy == "auto":
        key = (
            type(model).__qualname__,
            tuple((n, tuple(p.shape), p.dtype) for n, p in params.items()),
            support_x.device.type, tuple(support_x.shape), tuple(query_x.shape),
            steps, first_order, adapt_only is None, torch.is_grad_enabled(),
        )
        if key not in _CHOSEN:
            size = sum(p.numel() for p in params.values())
            what = f"{size:,} parameters, support {list(support_x.shape)}, {steps} steps"
            _CHOSEN[key] = _probe(what, run, params)
        strategy = _CHOSEN[key]
    if strategy not in ("vmap", "loop"):
        raise ValueError(f"unknown inner-loop strategy {strategy!r}; "
                         "expected 'auto', 'vmap' or 'loop'")
    return run(strategy)


#: How much slower vmap must be before "auto" prefers the loop.
CLEAR_WIN = 1.5
#: Strategy chosen by ``"auto"`` per (model, parameter shapes, device, episode shapes, ...).
_CHOSEN: dict[Hashable, Strategy] = {}


def adapt_episodes(model: nn.Module, episodes: Episodes, loss_fn: LossFn, **options: Any
                   ) -> Tensor:
    """:func:`adapt_and_predict` from the model's own parameters on a batch of episodes.

    ``options`` are :func:`adapt_and_predict`'s keywords (``steps``, ``lr``, ...).
    """
    return adapt_and_predict(model, parameters_of(model), episodes.support_x,
                             episodes.support_y, episodes.query_x, loss_fn, **options)


def _batch_norm_in_training(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training
               for m in model.modules())


#: Tasks of the batch that the "auto" probe times (the whole batch would cost seconds).
PROBE_TASKS = 8


def _probe(what: str, run: Callable[[Strategy, int], Tensor], params: Params) -> Strategy:
    """Time both strategies (forward and, in training, backward) and remember the faster."""
    wrt = [p for p in params.values() if p.requires_grad] if torch.is_grad_enabled() else []
    seconds: dict[Strategy, float] = {}
    for candidate in ("vmap", "loop"):
        timings = []
        for _ in range(2):  # the first call pays one-off costs (allocations, dispatch caches)
            start = time.perf_counter()
            out = run(candidate, PROBE_TASKS)
            if wrt:  # autograd.grad, not backward(): leaves no .grad behind
                torch.autograd.grad(out.sum(), wrt, allow_unused=True)
            elif out.device.type == "cuda":
                torch.cuda.synchronize(out.device)
            timings.append(time.perf_counter() - start)
        seconds[candidate] = timings[-1]
    # Only a clear win switches away from vmap: the two strategies agree only up to float
    # rounding, so a coin-flip choice on a noisy machine would make runs irreproducible.
    chosen: Strategy = "loop" if seconds["vmap"] > CLEAR_WIN * seconds["loop"] else "vmap"
    log.info("inner loop: %s for %s (vmap %.1f ms, loop %.1f ms)", chosen, what,
             1e3 * seconds["vmap"], 1e3 * seconds["loop"])
    return chosen
