"""An episode's forward passes with BatchNorm and max-pooling fused, for the inner loop.

In a second-order MAML meta-step on a convolutional backbone most of the time goes to the
query set's forward and backward pass (75 images against the support set's 5 in a 5-way
1-shot 15-query episode), and in a conv4 on a CPU its first block is memory-bound:
BatchNorm writes a full-resolution map, max-pooling keeps a quarter of it, and the backward
pass writes two more full-resolution maps (the pool's scattered gradient, then
BatchNorm's). A batch-statistics BatchNorm is a per-channel affine map ``a * x + b``
(``a = weight / sqrt(var + eps)``, ``b = bias - a * mean``), and an affine map of positive
slope commutes with the max (of negative slope, it turns it into a min), so

    max_pool2d(batch_norm(x)) = a * max_pool2d(x) + b      (per channel, a >= 0)

:class:`BatchNormMaxPool` computes the statistics in one pass over ``x``, pools ``x``
itself, and applies the affine map to the pooled quarter; its backward writes one
full-resolution gradient (BatchNorm's backward written for pooled outputs, plus the pooled
positions' share added in place), over the convolution's output where nothing else needs
it. The same function, float rounding apart (tests compare float64 meta-gradients with the
plain modules'); measured on a conv4 meta-step in benchmarks/README.md (finding 10).

Its backward is ``once_differentiable``: it serves a graph that is differentiated once.
The inner loop uses it only there: :func:`autometa.inner_loop.meta_backward`'s query pass,
whose loss is back-propagated once. The support passes, differentiated twice for a
second-order meta-gradient, run :class:`DifferentiableBatchNormMaxPool`: the same
forward, and a backward written in differentiable ops, mostly on the pooled map, in place
of BatchNorm's native double backward (finding 12). :func:`blocks_of` recognises the
models it can run (``nn.Sequential`` / :class:`~autometa.source_model.Backbone`
containers of leaf modules, with a ``BatchNorm2d`` of batch statistics followed by a
2x2 ``MaxPool2d``, a ``ReLU`` before or after the pool joining them); :func:`forward` runs
one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.func import functional_call

from autometa.source_model import chain_leaves

__all__ = ["OUTPUT_FREE_NODES", "BatchNormMaxPool", "FusedBlock", "Step",
           "DifferentiableBatchNormMaxPool", "blocks_of", "forward", "try_forward", "usable"]


#: Autograd nodes that keep their inputs, not their output, for their backward: a BatchNorm
#: input that one of them made is needed by no other backward, so the fused backward writes
#: its gradient over it (no new full-resolution map: ~5% of a conv4 meta-step on a CPU).
OUTPUT_FREE_NODES = frozenset({"ConvolutionBackward0"})


class BatchNormMaxPool(torch.autograd.Function):
    """``max_pool2d(batch_norm(x, weight, bias, training=True, eps), 2)`` in one node,
    followed by a ReLU where ``relu`` is true.

    Shapes: x (N, C, H, W) ``channels_last`` -> (N, C, H // 2, W // 2) ``channels_last``;
    weight, bias (C,). BatchNorm with the batch's own statistics (biased variance, no
    running statistics), as ``nn.BatchNorm2d(track_running_stats=False)`` in any mode.
    Channels whose scale ``a`` is negative pool the minimum (exact: see module docstring).
    Differentiable once (``once_differentiable``); where ``x`` is a convolution's output
    (:data:`OUTPUT_FREE_NODES`), the backward overwrites it with its gradient, so a second
    backward through the same graph (``retain_graph``) raises autograd's in-place error.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor,
                eps: float, relu: bool) -> Tensor:
        out, pooled, index, mean, var = _normalise_pooled(x, weight, bias, eps, relu)
        invstd = (var + eps).rsqrt()
        shift = bias - weight * invstd * mean
        # Not ``out``: a later in-place op (Dropout(inplace=True)) may change it; the ReLU's
        # mask is recomputed from the pooled map instead.
        ctx.save_for_backward(x, pooled, index, weight, mean, invstd, shift)
        ctx.relu = relu
        ctx.reuse_input = (x.grad_fn is not None and x._base is None
                           and type(x.grad_fn).__name__ in OUTPUT_FREE_NODES)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, pooled, index, weight, mean, invstd, shift = ctx.saved_tensors
        shape = (1, -1, 1, 1)
        if ctx.relu:  # the ReLU's backward, on its input recomputed
            before_relu = torch.addcmul(shift.view(shape), pooled, (weight * invstd).view(shape))
            grad = torch.ops.aten.threshold_backward(grad, before_relu, 0)
        dims = (0, 2, 3)
        count = x.numel() // x.size(1)  # the statistics' sample size, N * H * W
        grad_bias = grad.sum(dims)
        # sum(grad * (pooled - mean) * invstd), without that map
        grad_weight = ((grad * pooled).sum(dims) - mean * grad_bias) * invstd
        grad_x = None
        if ctx.needs_input_grad[0]:
            # BatchNorm's backward (its output's gradient is zero off the pooled positions):
            # dx = invstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)), dxhat = g * w
            slope = -invstd * invstd * weight * grad_weight / count
            offset = -invstd * weight * grad_bias / count - slope * mean
            if ctx.reuse_input:
                grad_x = torch.addcmul(offset.view(shape), x, slope.view(shape), out=x)
            else:
                grad_x = torch.addcmul(offset.view(shape), x, slope.view(shape))
                grad_x = grad_x.contiguous(memory_format=torch.channels_last)
            n, c, h, w = x.shape
            rows = grad_x.permute(0, 2, 3, 1).view(n, h * w, c)  # (N, H*W, C) in place
            src = grad * (weight * invstd).view(shape)
            rows.scatter_add_(1, _rows(index, c), _rows(src, c))
        return (grad_x, grad_weight if ctx.needs_input_grad[1] else None,
                grad_bias if ctx.needs_input_grad[2] else None, None, None)


class DifferentiableBatchNormMaxPool(torch.autograd.Function):
    """:class:`BatchNormMaxPool` for a graph that is differentiated more than once: a
    support set's loss, whose gradient is taken with ``create_graph=True`` and then
    back-propagated by a second-order meta-gradient.

    Shapes and semantics as :class:`BatchNormMaxPool`. The backward is written in
    differentiable ops, most of them on the pooled quarter-size map (the ReLU's mask,
    the affine map's gradients), with one full-resolution affine map and a scatter of the
    pooled positions' share; the batch statistics' derivative comes from
    :class:`_BatchStatistics`. Autograd differentiates that backward for the second
    derivative, which BatchNorm's native double backward does with ~30 full-resolution
    ops (benchmarks/README.md, finding 12); differentiable any number of times (the
    ReLU's mask and the pooled positions, piecewise constant, have no derivative, as in
    the modules). Nothing is written in place: ``x`` stays valid.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor,
                eps: float, relu: bool) -> Tensor:
        out, _, index, mean, var = _normalise_pooled(x, weight, bias, eps, relu)
        ctx.save_for_backward(x, weight, bias, index, mean, var)
        ctx.eps, ctx.relu = eps, relu
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, bias, saved_index, saved_mean, saved_var = ctx.saved_tensors
        n, c, h, w = x.shape
        count = n * h * w  # the statistics' sample size
        mean, var = _BatchStatistics.apply(x, saved_mean, saved_var)
        invstd = (var + ctx.eps).rsqrt()
        scale = weight * invstd
        # (N, positions, C) rows: channels last, so (C,) vectors broadcast without views
        index, rows_x, grad = _rows(saved_index, c), _rows(x, c), _rows(grad, c)
        pooled = rows_x.gather(1, index)
        if ctx.relu:  # the ReLU's backward (its mask has no derivative)
            with torch.no_grad():
                before_relu = torch.addcmul(bias - scale * mean, pooled, scale)
            grad = torch.ops.aten.threshold_backward(grad, before_relu, 0)
        grad_bias = grad.sum((0, 1))
        grad_weight = (grad * ((pooled - mean) * invstd)).sum((0, 1))
        grad_x = None
        if ctx.needs_input_grad[0]:  # as BatchNormMaxPool's, out of place
            slope = -scale * invstd * grad_weight / count
            offset = -scale * grad_bias / count - slope * mean
            rows = torch.addcmul(offset, rows_x, slope).scatter_add(1, index, grad * scale)
            grad_x = rows.view(n, h, w, c).permute(0, 3, 1, 2)  # channels_last (N, C, H, W)
        return (grad_x, grad_weight if ctx.needs_input_grad[1] else None,
                grad_bias if ctx.needs_input_grad[2] else None, None, None)


class _BatchStatistics(torch.autograd.Function):
    """Per-channel ``(mean, var)`` of x (N, C, H, W), biased, as already computed by the
    forward pass (returned as copies), with their derivative w.r.t. ``x``:
    ``d/dx = (grad_mean + 2 * grad_var * (x - mean)) / (N * H * W)``, itself written with
    this function's mean, so differentiable any number of times."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, mean: Tensor, var: Tensor) -> tuple[Tensor, Tensor]:
        ctx.save_for_backward(x, mean, var)
        return mean.clone(), var.clone()

    @staticmethod
    def backward(ctx: Any, grad_mean: Tensor, grad_var: Tensor) -> tuple[Tensor | None, ...]:
        x, mean, var = ctx.saved_tensors
        mean, _ = _BatchStatistics.apply(x, mean, var)  # its dependence on x, for higher orders
        count = x.numel() // x.size(1)
        slope = 2 * grad_var / count
        offset = grad_mean / count - slope * mean
        shape = (1, -1, 1, 1)
        return torch.addcmul(offset.view(shape), x, slope.view(shape)), None, None


def _normalise_pooled(x: Tensor, weight: Tensor, bias: Tensor, eps: float, relu: bool
                      ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The block's output, the pooled map and its indices, and the batch's per-channel
    mean and biased variance (both blocks' forward pass)."""
    mean, var = torch.batch_norm_update_stats(x, None, None, 0.0)  # one pass, biased
    scale = weight * (var + eps).rsqrt()
    shape = (1, -1, 1, 1)
    if bool((scale < 0).any()):  # pool the minimum of those channels
        sign = torch.where(scale < 0, -1.0, 1.0).to(x.dtype).view(shape)
        pooled, index = F.max_pool2d(x * sign, 2, return_indices=True)
        pooled = pooled * sign
    else:
        pooled, index = F.max_pool2d(x, 2, return_indices=True)
    out = torch.addcmul((bias - scale * mean).view(shape), pooled, scale.view(shape))
    if relu:
        out.clamp_min_(0)
    return out, pooled, index, mean, var


def _rows(t: Tensor, channels: int) -> Tensor:
    """(N, C, h, w) as (N, h*w, C) rows, a view where ``t`` is ``channels_last``."""
    return t.permute(0, 2, 3, 1).reshape(t.size(0), -1, channels)


@dataclass(frozen=True)
class FusedBlock:
    """A BatchNorm2d, the 2x2 max-pool after it and, with ``relu``, a ReLU after the pool
    or between the two (the max commutes with it)."""

    prefix: str  # the BatchNorm's parameter names' prefix, e.g. "features.1."
    norm: nn.BatchNorm2d
    relu: bool


#: One step of :func:`forward`: a leaf module with its parameters' prefix, or a fused block.
Step = tuple[str, nn.Module] | FusedBlock


def blocks_of(model: nn.Module) -> list[Step] | None:
    """The model's leaf modules in forward order with its BatchNorm/max-pool pairs fused,
    or None where it has no such pair or is not a chain this module can run.

    Recognised: ``nn.Sequential`` and :class:`~autometa.source_model.Backbone` containers
    (by exact type) of leaf modules without hooks. A pair is an ``nn.BatchNorm2d`` without
    running statistics, with learned scale and shift, followed by ``nn.MaxPool2d(2)``
    (stride 2, no padding, dilation 1, floor mode), or by ``nn.ReLU`` and then that pool;
    a ``ReLU`` right after the pool joins the block.
    """
    leaves = chain_leaves(model)
    if leaves is None:
        return None
    steps: list[Step] = []
    i, fused = 0, False
    while i < len(leaves):
        prefix, module = leaves[i]
        after = [m for _, m in leaves[i + 1 : i + 3]]
        if _fusable_norm(module) and after and _pool2(after[0]):  # BN, pool[, ReLU]
            relu = len(after) == 2 and _relu(after[1])
            steps.append(FusedBlock(prefix, module, relu))  # type: ignore[arg-type]
            i, fused = i + (3 if relu else 2), True
        elif (_fusable_norm(module) and len(after) == 2 and _relu(after[0])
              and _pool2(after[1])):  # BN, ReLU, pool: the max commutes with the ReLU
            steps.append(FusedBlock(prefix, module, relu=True))  # type: ignore[arg-type]
            i, fused = i + 3, True
        else:
            steps.append((prefix, module))
            i += 1
    return steps if fused else None


def _fusable_norm(m: nn.Module) -> bool:  # (chain_leaves refused hooked modules)
    return type(m) is nn.BatchNorm2d and m.running_mean is None and m.affine


def _relu(m: nn.Module) -> bool:
    return type(m) is nn.ReLU


def _pool2(m: nn.Module) -> bool:
    if type(m) is not nn.MaxPool2d:
        return False
    two = (2, (2, 2))
    return (m.kernel_size in two and m.stride in (*two, None) and m.padding in (0, (0, 0))
            and m.dilation in (1, (1, 1)) and not m.ceil_mode and not m.return_indices)


def usable(x: Tensor) -> bool:
    """Whether :func:`forward` may run on ``x``: a float32/float64 CPU batch, gradients
    enabled, no autocast (elsewhere the plain modules run)."""
    return (x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)
            and torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu"))


def try_forward(model: nn.Module, params: Mapping[str, Tensor], x: Tensor, *,
                higher_order: bool = False) -> Tensor | None:
    """:func:`forward` where :func:`usable` and :func:`blocks_of` allow it, else None."""
    if not usable(x):
        return None
    steps = blocks_of(model)
    return None if steps is None else forward(steps, params, x, higher_order=higher_order)


def forward(steps: list[Step], params: Mapping[str, Tensor], x: Tensor, *,
            higher_order: bool = False) -> Tensor:
    """The model on ``x`` with ``params`` (``{name: tensor}``, as ``functional_call``
    takes them), each fused block one :class:`BatchNormMaxPool` node (with ``higher_order``, a
    :class:`DifferentiableBatchNormMaxPool`) where its input is a 4-d
    ``channels_last`` map (a block whose input is not runs its modules as they are)."""
    h = x
    for step in steps:
        if isinstance(step, FusedBlock):
            h = _fused(step, params, h, higher_order)
        else:
            prefix, module = step
            own = {n: params[prefix + n] for n, _ in module.named_parameters()
                   if prefix + n in params}
            h = functional_call(module, own, (h,)) if own else module(h)
    return h


def _fused(block: FusedBlock, params: Mapping[str, Tensor], h: Tensor,
           higher_order: bool) -> Tensor:
    weight = params.get(block.prefix + "weight", block.norm.weight)
    bias = params.get(block.prefix + "bias", block.norm.bias)
    if h.dim() != 4 or not h.is_contiguous(memory_format=torch.channels_last) or min(
            h.shape[2:]) < 2:
        h = F.max_pool2d(F.batch_norm(h, None, None, weight, bias, True, 0.0,
                                      block.norm.eps), 2)
        return torch.relu(h) if block.relu else h
    function = DifferentiableBatchNormMaxPool if higher_order else BatchNormMaxPool
    return function.apply(h, weight, bias, block.norm.eps, block.relu)
