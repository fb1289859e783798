"""The inner-loop toolkit shared by gradient-based meta-algorithms, on torch.func.

Parameters are handled functionally, as a ``{name: tensor}`` dict evaluated through
``torch.func.functional_call``. Adaptation is differentiable end to end: the meta-gradient
flows through the inner SGD steps (second order) unless ``first_order`` treats the inner
gradients as constants. Episodes are processed either all at once with ``torch.func.vmap``
(``"vmap"``) or one at a time (``"loop"``); both give the same values and gradients.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

Params = dict[str, Tensor]
LossFn = Callable[[Tensor, Tensor], Tensor]
Strategy = Literal["vmap", "loop"]
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

    if strategy == "vmap":
        return vmap(one)(support_x, support_y, query_x)
    if strategy == "loop":
        return torch.stack([one(*t) for t in zip(support_x, support_y, query_x, strict=True)])
    raise ValueError(f"unknown inner-loop strategy {strategy!r}; expected 'vmap' or 'loop'")
