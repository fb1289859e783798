"""The stacked perceptron path of the inner loop (autometa.stacked) against vmap of the
per-episode adaptation (torch.func), in float64: values and meta-gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

from autometa import Episodes, inner_loop, stacked
from autometa.source_model import Backbone

TASKS = 6


def perceptron(inputs: tuple[int, ...], outputs: int, activation: type[nn.Module] = nn.ReLU
               ) -> nn.Module:
    width = 1
    for size in inputs:
        width *= size
    return Backbone(nn.Sequential(nn.Flatten(), nn.Linear(width, 16), activation(),
                                  nn.Linear(16, 16), activation()),
                    nn.Linear(16, outputs)).double()


def reference(model: nn.Module, params: dict[str, torch.Tensor], sx: torch.Tensor,
              sy: torch.Tensor, qx: torch.Tensor, loss_fn, **options) -> torch.Tensor:
    """vmap of torch.func adaptation per episode: the path the stacked one replaces."""

    def one(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        fast = inner_loop.adapt(model, params, a, b, loss_fn, **options)
        return functional_call(model, fast, (c,))

    return vmap(one)(sx, sy, qx)


def grads_of(model: nn.Module, lr: object, fn) -> list[torch.Tensor]:
    model.zero_grad()
    if isinstance(lr, dict):
        for value in lr.values():
            value.grad = None
    fn().backward()
    out = [p.grad.clone() for p in model.parameters()]
    if isinstance(lr, dict):
        out += [v.grad.clone() for v in lr.values() if v.grad is not None]
    return out


def episodes(kind: str) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    if kind == "regression":
        x = torch.randn(TASKS, 10, 1, generator=g, dtype=torch.float64)
        y = torch.randn(TASKS, 10, 1, generator=g, dtype=torch.float64)
        return x[:, :5], y[:, :5], x[:, 5:], y[:, 5:]
    x = torch.randn(TASKS, 12, 2, 3, 3, generator=g, dtype=torch.float64)  # images
    y = torch.randint(0, 3, (TASKS, 12), generator=g)
    return x[:, :6], y[:, :6], x[:, 6:], y[:, 6:]


@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("kind", ["regression", "classification"])
@pytest.mark.parametrize("variant", ["maml", "anil", "metasgd"])
def test_meta_gradients_equal_vmap_in_float64(steps: int, first_order: bool, kind: str,
                                              variant: str) -> None:
    torch.manual_seed(1)
    sx, sy, qx, qy = episodes(kind)
    model = perceptron((1,) if kind == "regression" else (2, 3, 3),
                       1 if kind == "regression" else 3, nn.Tanh)
    loss_fn = F.mse_loss if kind == "regression" else F.cross_entropy
    lr: object = 0.1
    adapt_only = None
    if variant == "anil":
        adapt_only = lambda name: name.startswith("head.")  # noqa: E731
    if variant == "metasgd":  # a learned step size per parameter element
        lr = {n: torch.full_like(p, 0.05).requires_grad_() for n, p in model.named_parameters()}
    options = dict(steps=steps, lr=lr, first_order=first_order, adapt_only=adapt_only)
    assert stacked.layers_of(model) is not None

    def ours() -> torch.Tensor:
        pred = inner_loop.adapt_and_predict(model, dict(model.named_parameters()), sx, sy,
                                            qx, loss_fn, strategy="vmap", **options)
        return vmap(loss_fn)(pred, qy).mean()

    def theirs() -> torch.Tensor:
        pred = reference(model, dict(model.named_parameters()), sx, sy, qx, loss_fn,
                         **options)
        return vmap(loss_fn)(pred, qy).mean()

    expected, got = grads_of(model, lr, theirs), grads_of(model, lr, ours)
    assert len(expected) == len(got)
    for e, g in zip(expected, got, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


def test_predictions_under_no_grad_equal_vmap_and_keep_no_graph() -> None:
    sx, sy, qx, _ = episodes("classification")
    model = perceptron((2, 3, 3), 3)
    params = dict(model.named_parameters())
    with torch.no_grad():
        got = inner_loop.adapt_and_predict(model, params, sx, sy, qx, F.cross_entropy,
                                           steps=2, lr=0.1, strategy="auto")
        expected = reference(model, params, sx, sy, qx, F.cross_entropy, steps=2, lr=0.1)
    assert not got.requires_grad
    assert got.shape == (TASKS, 6, 3)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_only_plain_perceptrons_are_stacked() -> None:
    mlp = perceptron((1,), 1)
    assert [name for name, _ in stacked.layers_of(mlp) or []] == [
        "features.0.", "features.1.", "features.2.", "features.3.", "features.4.", "head."]

    class Custom(nn.Sequential):  # may override forward
        pass

    conv = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2, 1))
    norm = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    hooked = nn.Sequential(nn.Linear(2, 2))
    hooked[0].register_forward_hook(lambda module, args, out: out * 2)
    for model in (conv, norm, Custom(nn.Linear(2, 2)), nn.Sequential(nn.Flatten(0)), hooked):
        assert stacked.layers_of(model) is None


@pytest.mark.parametrize(("hidden", "threads_inside"), [(40, 1), (1024, 2)])
def test_a_small_perceptron_runs_on_one_thread(hidden: int, threads_inside: int) -> None:
    """A perceptron whose largest layer is below stacked.SMALL_MACS multiply-adds runs its
    meta-step on one intra-op thread (a second one's wake-ups cost more than they give);
    a larger one keeps torch's setting; both leave the setting as it was."""
    model = nn.Sequential(nn.Linear(8, hidden), nn.ReLU(), nn.Linear(hidden, hidden),
                          nn.ReLU(), nn.Linear(hidden, 1))
    g = torch.Generator().manual_seed(0)
    batch = Episodes(torch.randn(25, 10, 8, generator=g), torch.randn(25, 10, 1, generator=g),
                     torch.randn(25, 10, 8, generator=g), torch.randn(25, 10, 1, generator=g))
    seen: list[int] = []

    def loss(pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        seen.append(torch.get_num_threads())
        return F.mse_loss(pred, y)

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        inner_loop.meta_backward(model, batch, loss, steps=1, lr=0.01, strategy="vmap")
        assert set(seen) == {threads_inside}
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_an_activation_placed_twice_runs_twice_and_tied_weights_are_refused() -> None:
    act = nn.Tanh()
    model = nn.Sequential(nn.Linear(3, 5), act, nn.Linear(5, 5), act, nn.Linear(5, 1))
    layers = stacked.layers_of(model)
    assert layers is not None and len(layers) == 5
    x = torch.randn(2, 4, 3)
    out = stacked.forward(layers, dict(model.named_parameters()), x)
    torch.testing.assert_close(out, model(x))
    lin = nn.Linear(5, 5)
    assert stacked.layers_of(nn.Sequential(nn.Linear(3, 5), lin, nn.ReLU(), lin)) is None
