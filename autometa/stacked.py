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
:func:`layers_of` recognises the model; nothing else changes for the caller.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn
from torch.func import vmap

from autometa.source_model import Backbone

Params = dict[str, Tensor]
LossFn = Callable[[Tensor, Tensor], Tensor]
LearningRate = float | Tensor | Mapping[str, Tensor]  # as autometa.inner_loop's

__all__ = ["ELEMENTWISE", "adapt_and_predict", "layers_of"]

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
    if model._forward_hooks or model._forward_pre_hooks:
        return None
    kind = type(model)
    if kind is nn.Sequential:
        children: list[tuple[str, nn.Module]] = list(model.named_children())
    elif kind is Backbone:
        children = [("features", model.get_submodule("features")),
                    ("head", model.get_submodule("head"))]
    elif kind is nn.Linear or kind in ELEMENTWISE or (
            kind is nn.Flatten and model.start_dim == 1 and model.end_dim == -1):
        if kind is not nn.Linear and (any(True for _ in model.parameters())
                                      or any(True for _ in model.buffers())):
            return None
        return [(prefix, model)]
    else:
        return None
    layers: list[Layer] = []
    for name, child in children:
        inner = layers_of(child, f"{prefix}{name}.")
        if inner is None:
            return None
        layers += inner
    return layers


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


def adapt_and_predict(
    layers: list[Layer],
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
) -> Tensor:
    """:func:`autometa.inner_loop.adapt_and_predict` for a perceptron (:func:`layers_of`).

    Shapes: support_x (tasks, n_s, *in), support_y (tasks, n_s[, out]), query_x (tasks,
    n_q, *in) -> (tasks, n_q, out). ``loss_fn(pred, y)`` is one episode's mean loss (it
    is vmapped over the episodes). With gradients enabled the result is differentiable
    w.r.t. ``params`` (second order unless ``first_order``) and tensors in ``lr``; under
    ``no_grad`` the inner steps still take gradients, and nothing keeps a graph.
    """
    tasks = support_x.shape[0]
    keep = torch.is_grad_enabled()  # a meta-gradient will flow back through the steps
    names = [n for n in params if adapt_only is None or adapt_only(n)]
    frozen = {n: p for n, p in params.items() if n not in names}

    def leaf(p: Tensor) -> Tensor:
        return p.detach().requires_grad_()

    fast = {n: params[n].unsqueeze(0).expand(tasks, *params[n].shape) for n in names}
    fast = {n: p if keep and p.requires_grad else leaf(p) for n, p in fast.items()}
    episode_loss = vmap(loss_fn)
    with torch.enable_grad():
        for _ in range(steps):
            losses = episode_loss(forward(layers, {**frozen, **fast}, support_x), support_y)
            grads = torch.autograd.grad(losses.sum(), list(fast.values()),
                                        create_graph=keep and not first_order)
            fast = {n: p - _lr(lr, n) * g for (n, p), g in zip(fast.items(), grads,
                                                                strict=True)}
            if not keep:
                fast = {n: leaf(p) for n, p in fast.items()}
    if not keep:
        fast = {n: p.detach() for n, p in fast.items()}
    return forward(layers, {**frozen, **fast}, query_x)


def _lr(lr: LearningRate, name: str) -> float | Tensor:
    return lr[name] if isinstance(lr, Mapping) else lr
