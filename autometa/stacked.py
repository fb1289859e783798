"""All episodes of a batch adapted at once for a multilayer perceptron, without vmap.

A perceptron (linear layers, ``Flatten`` and element-wise activations, in an
``nn.Sequential`` or a :class:`~autometa.source_model.Backbone`) has a batched form that
needs no transform: each adapted parameter is stacked per episode, ``(tasks, *shape)``;
a linear layer is a batched matrix product (``torch.baddbmm``); and one
``torch.autograd.grad`` of the summed per-episode support losses gives every episode's
inner gradient at once (the episodes are independent, so slice ``t`` of the gradient is
episode ``t``'s own). This is the computation of ``vmap`` over
:func:`autometa.inner_loop.adapt` (the same values and meta-gradients up to float
rounding, checked in float64 by tests/test_stacked.py) without vmap's and
``torch.func.grad``'s per-call transform set-up, which dominates a small model's step:
benchmarks/README.md, finding 9, measured the sinusoid MAML meta-step.

:func:`autometa.inner_loop.adapt_and_predict` takes this path where it would vmap and
:func:`layers_of` recognises the model, running its inner steps with :func:`forward`
through the same ``torch.autograd.grad`` steps as the loop strategy; nothing else changes
for the caller.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch
from torch import Tensor, nn

from autometa.source_model import chain_leaves

__all__ = ["ELEMENTWISE", "SMALL_MACS", "forward", "layers_of", "threads_for"]

#: Parameter-free activations applied element by element: the same on a stacked batch.
ELEMENTWISE: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Softplus,
    nn.Identity,
)

#: A layer as :func:`layers_of` lists it: (its parameters' name prefix, the module).
Layer = tuple[str, nn.Module]

#: Below this many multiply-adds in its largest layer (all episodes' examples at once), a
#: stacked perceptron runs on one CPU thread. Its kernels then take microseconds, and on
#: 2 cores a second intra-op thread cost more than it gave: every parallel kernel wakes a
#: sleeping thread (autometa's passive OpenMP wait, autometa.threads), and on an idle
#: virtual CPU that wake-up outlasts the kernel. Sinusoid MAML (1-40-40-1, meta-batch 25,
#: ~0.4 M multiply-adds) on a quiet 2-core machine: ~10,000 tasks/s on one thread against
#: ~4,000 on two (benchmarks/README.md, finding 11).
SMALL_MACS = 1 << 23


def layers_of(model: nn.Module) -> list[Layer] | None:
    """The model's layers in the order its forward runs them, if it is a perceptron this
    module can run stacked; None otherwise.

    Recognised, by exact type (a subclass may override ``forward``): ``nn.Sequential``
    and :class:`~autometa.source_model.Backbone` (``head(features(x))``) of further such
    containers, ``nn.Linear``, ``nn.Flatten`` over all but the batch dimension, and the
    activations of :data:`ELEMENTWISE`. Anything else (a convolution, BatchNorm, LoRA
    adapters, a hook on a module) gives None.
    """
    layers = chain_leaves(model)
    if layers is None or not all(_stackable(m) for _, m in layers):
        return None
    return layers


def _stackable(m: nn.Module) -> bool:
    kind = type(m)
    if kind is nn.Linear:
        return True
    if kind in ELEMENTWISE or (kind is nn.Flatten and m.start_dim == 1 and m.end_dim == -1):
        return not any(True for _ in m.parameters()) and not any(True for _ in m.buffers())
    return False


@contextlib.contextmanager
def threads_for(model: nn.Module, *batches: Tensor) -> Iterator[None]:
    """One intra-op thread inside, where ``model`` is a perceptron :func:`layers_of`
    recognises whose largest layer on the largest of ``batches`` (each (tasks, n, *in))
    is below :data:`SMALL_MACS` multiply-adds on a CPU; otherwise torch's setting as it
    is. Restored on exit. ``torch.set_num_threads`` is process-wide: call it from one
    thread at a time (the meta-step's), not from the inner loop's episode workers."""
    before = torch.get_num_threads()
    if before == 1:  # already one (an outer meta-step's threads_for): no model walk again
        yield
        return
    layers = layers_of(model) if batches[0].device.type == "cpu" else None
    rows = max(b.shape[0] * b.shape[1] if b.dim() >= 2 else 1 for b in batches)
    macs = max((rows * m.in_features * m.out_features for _, m in layers or []
                if isinstance(m, nn.Linear)), default=SMALL_MACS)
    if macs >= SMALL_MACS:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def forward(layers: list[Layer], params: Mapping[str, Tensor], x: Tensor) -> Tensor:
    """The perceptron on every episode at once: x (tasks, n, *in) -> (tasks, n, out).

    A parameter in ``params`` is stacked, (tasks, *shape), or shared by all episodes, (*shape).
    """
    h = x
    for prefix, module in layers:
        if isinstance(module, nn.Linear):
            weight = params[f"{prefix}weight"]  # (tasks, out, in) or (out, in)
            bias = params.get(f"{prefix}bias")  # (tasks, out), (out,) or None
            if weight.dim() == 3 and bias is not None and bias.dim() == 2:
                h = torch.baddbmm(bias.unsqueeze(1), h, weight.transpose(1, 2))
                continue
            h = torch.bmm(h, weight.transpose(1, 2)) if weight.dim() == 3 else h @ weight.T
            if bias is not None:
                h = h + (bias.unsqueeze(1) if bias.dim() == 2 else bias)
        elif isinstance(module, nn.Flatten):
            h = h.flatten(2)  # each episode's examples flattened, as Flatten() on (n, *in)
        else:
            h = module(h)
    return h

