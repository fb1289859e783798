"""Second-order meta-gradients through BatchNorm: the loop is used, vmap is refused.

PyTorch's vmap batching rule for BatchNorm's double backward is wrong (functorch #534); a
model such as conv4 must never train on it silently.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from autometa.inner_loop import adapt_and_predict, parameters_of


def model_and_data() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1),
                        nn.BatchNorm2d(3, track_running_stats=False), nn.ReLU(),
                        nn.Flatten(), nn.Linear(3 * 6 * 6, 2)).double()
    sx, qx = torch.randn(3, 4, 1, 6, 6).double(), torch.randn(3, 5, 1, 6, 6).double()
    sy, qy = torch.randint(2, (3, 4)), torch.randint(2, (3, 5))
    return net, (sx, sy, qx, qy)


def loss(pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(pred.reshape(-1, pred.shape[-1]), y.reshape(-1))


def reference(net: nn.Module, data: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    """Plain autograd, one task at a time, create_graph=True."""
    sx, sy, qx, qy = data
    names, weights = zip(*net.named_parameters(), strict=True)
    losses = []
    for t in range(len(sx)):
        fast = list(weights)
        support = loss(functional_call(net, dict(zip(names, fast, strict=True)), (sx[t],)),
                       sy[t])
        grads = torch.autograd.grad(support, fast, create_graph=True)
        fast = [w - 0.1 * g for w, g in zip(fast, grads, strict=True)]
        losses.append(loss(functional_call(net, dict(zip(names, fast, strict=True)), (qx[t],)),
                           qy[t]))
    return list(torch.autograd.grad(torch.stack(losses).mean(), weights))


def meta_gradient(net: nn.Module, data: tuple[torch.Tensor, ...], strategy: str
                  ) -> list[torch.Tensor]:
    sx, sy, qx, qy = data
    pred = adapt_and_predict(net, parameters_of(net), sx, sy, qx, loss, steps=1, lr=0.1,
                             strategy=strategy)
    return list(torch.autograd.grad(loss(pred, qy), list(net.parameters())))


@pytest.mark.parametrize("strategy", ["auto", "loop"])
def test_second_order_through_batchnorm_matches_the_reference(strategy: str) -> None:
    """auto and loop give the true meta-gradient of a conv-BatchNorm model (float64)."""
    net, data = model_and_data()
    for got, expected in zip(meta_gradient(net, data, strategy), reference(net, data),
                             strict=True):
        assert torch.allclose(got, expected, rtol=1e-6, atol=1e-9)


def test_vmap_is_refused_for_second_order_through_batchnorm() -> None:
    """An explicit vmap request says why it cannot be honoured."""
    net, data = model_and_data()
    with pytest.raises(ValueError, match="BatchNorm"):
        meta_gradient(net, data, "vmap")


def test_vmap_stays_available_without_second_order() -> None:
    """Evaluation (no grad) and first-order adaptation may still use vmap, matching the loop."""
    net, (sx, sy, qx, _) = model_and_data()
    with torch.no_grad():
        outs = [adapt_and_predict(net, parameters_of(net), sx, sy, qx, loss, steps=2, lr=0.1,
                                  strategy=s) for s in ("vmap", "loop")]
    assert torch.allclose(outs[0], outs[1], atol=1e-10)
