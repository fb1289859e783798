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

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from autometa.source_model import chain_leaves

__all__ = ["ELEMENTWISE", "forward", "layers_of"]

#: Parameter-free activations applied element by element: the same on a stacked batch.
ELEMENTWISE: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Softplus,
    nn.Identity,
)

#: A layer as :func:`layers_of` lists it: (its parameters' name prefix, the module).
Layer = tuple[str, nn.Module]


def layers_of(model: nn.Module, prefix: str = "") -> list[Layer] | None:
    """The model's layers in the order its forward runs them, if it is a perceptron this
    module can run stacked; None otherwise.

    Recognised, by exact type (a subclass may override ``forward``): ``nn.Sequential``
    and :class:`~autometa.source_model.Backbone` (``head(features(x))``) of further such
    containers, ``nn.Linear``, ``nn.Flatten`` over all but the batch dimension, and the
    activations of :data:`ELEMENTWISE`. Anything else (a convolution, BatchNorm, LoRA
    adapters, a hook on a module) gives None.
    """
    layers = chain_leaves(model, prefix)
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

