"""The query pass's fused BatchNorm + max-pool (autometa.fused_blocks): the same
meta-gradients as the plain modules in float64, taken only where it is safe."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from autometa import Backbone, Episodes
from autometa.fused_blocks import blocks_of, forward
from autometa.inner_loop import adapt_and_predict, meta_backward, parameters_of


class NHWCConv(nn.Conv2d):
    """A convolution run channels_last, as the conv4 source runs it on a CPU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.contiguous(memory_format=torch.channels_last))


def block(order: str, cin: int, cout: int) -> list[nn.Module]:
    bn = nn.BatchNorm2d(cout, track_running_stats=False)
    conv = NHWCConv(cin, cout, 3, padding=1)
    return {"bn-pool-relu": [conv, bn, nn.MaxPool2d(2), nn.ReLU()],  # conv4's order
            "bn-relu-pool": [conv, bn, nn.ReLU(), nn.MaxPool2d(2)],  # the paper's order
            "relu-bn-pool": [conv, nn.ReLU(), bn, nn.MaxPool2d(2)],  # input kept by ReLU
            "bn-pool": [conv, bn, nn.MaxPool2d(2)]}[order]


def net(order: str, side: int = 9) -> Backbone:
    """Three blocks on (3, side, side) images (9 -> 4 -> 2 -> 1: odd sides too), a head;
    float64, with negative BatchNorm scales in some channels."""
    torch.manual_seed(0)
    layers = block(order, 3, 6) + block(order, 6, 6) + block(order, 6, 6)
    model = Backbone(nn.Sequential(*layers, nn.Flatten()), nn.Linear(6 * (side // 8) ** 2, 4))
    model = model.double()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(-1.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return model


def episodes(tasks: int = 3, side: int = 9) -> Episodes:
    g = torch.Generator().manual_seed(1)
    return Episodes(torch.rand(tasks, 4, 3, side, side, generator=g).double(),
                    torch.arange(4).repeat(tasks, 1),
                    torch.rand(tasks, 12, 3, side, side, generator=g).double(),
                    torch.arange(4).repeat(tasks, 3))


def loss(pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(pred.reshape(-1, pred.shape[-1]), y.reshape(-1))


def reference(model: nn.Module, batch: Episodes, steps: int, lr: float) -> list[torch.Tensor]:
    """Second-order MAML meta-gradient by plain autograd through the model's own modules."""
    names, weights = zip(*model.named_parameters(), strict=True)
    losses = []
    for t in range(len(batch)):
        fast = list(weights)
        for _ in range(steps):
            support = F.cross_entropy(
                functional_call(model, dict(zip(names, fast, strict=True)),
                                (batch.support_x[t],)), batch.support_y[t])
            grads = torch.autograd.grad(support, fast, create_graph=True)
            fast = [w - lr * g for w, g in zip(fast, grads, strict=True)]
        query = functional_call(model, dict(zip(names, fast, strict=True)), (batch.query_x[t],))
        losses.append(F.cross_entropy(query, batch.query_y[t]))
    return list(torch.autograd.grad(torch.stack(losses).mean(), weights))


def nodes(t: torch.Tensor) -> set[str]:
    """The names of the autograd nodes behind ``t``."""
    seen, todo, names = set(), [t.grad_fn], set()
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        todo += [n for n, _ in node.next_functions]
    return names


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("steps", [1, 2])
@pytest.mark.parametrize("order", ["bn-pool-relu", "bn-relu-pool", "relu-bn-pool", "bn-pool"])
def test_meta_gradient_equals_the_plain_modules(order: str, steps: int, threads: int) -> None:
    model = net(order)
    batch = episodes()
    expected = reference(model, batch, steps, lr=0.3)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        meta_backward(model, batch, loss, steps=steps, lr=0.3, strategy="loop")
    finally:
        torch.set_num_threads(before)
    for (name, p), e in zip(model.named_parameters(), expected, strict=True):
        torch.testing.assert_close(p.grad, e, rtol=1e-9, atol=1e-12, msg=name)


def test_the_query_pass_runs_fused_and_refuses_a_second_derivative() -> None:
    model = net("bn-pool-relu")
    batch = episodes(1)
    params = parameters_of(model)
    pred = adapt_and_predict(model, params, batch.support_x, batch.support_y, batch.query_x,
                             loss, steps=1, lr=0.3, strategy="loop", fused_query=True)
    assert "BatchNormMaxPoolBackward" in nodes(pred)
    first = torch.autograd.grad(loss(pred, batch.query_y), list(params.values()),
                                create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|inplace"):
        torch.autograd.grad(sum(g.sum() for g in first), list(params.values()))


def test_without_fused_query_the_plain_modules_run() -> None:
    """adapt_and_predict's default keeps every graph differentiable twice (a user's Hessian)."""
    model = net("bn-pool-relu")
    batch = episodes(1)
    pred = adapt_and_predict(model, parameters_of(model), batch.support_x, batch.support_y,
                             batch.query_x, loss, steps=1, lr=0.3, strategy="loop")
    assert "BatchNormMaxPoolBackward" not in nodes(pred)


def test_a_second_backward_through_a_reused_input_raises() -> None:
    """The backward writes the gradient over a convolution's output (no new map): a
    retained graph's second backward is refused by autograd, not silently wrong."""
    model = net("bn-pool-relu")
    x = episodes(1).query_x[0]
    out = forward(blocks_of(model), parameters_of(model), x).sum()
    out.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="inplace"):
        out.backward()


def test_nchw_maps_run_the_plain_modules() -> None:
    layers = [nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6, track_running_stats=False),
              nn.MaxPool2d(2), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 16, 2)]
    model = nn.Sequential(*layers).double()
    x = torch.rand(5, 3, 8, 8, dtype=torch.float64)
    out = forward(blocks_of(model), parameters_of(model), x)
    assert "BatchNormMaxPoolBackward" not in nodes(out)
    torch.testing.assert_close(out, model(x), rtol=0, atol=0)


@pytest.mark.parametrize("make", [
    lambda: nn.Sequential(NHWCConv(3, 4, 3), nn.BatchNorm2d(4), nn.MaxPool2d(2)),  # running
    lambda: nn.Sequential(NHWCConv(3, 4, 3), nn.BatchNorm2d(4, affine=False,
                                                            track_running_stats=False),
                          nn.MaxPool2d(2)),
    lambda: nn.Sequential(NHWCConv(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False),
                          nn.MaxPool2d(3)),
    lambda: nn.Sequential(NHWCConv(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False),
                          nn.MaxPool2d(2, ceil_mode=True)),
    lambda: nn.Sequential(NHWCConv(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False),
                          nn.AvgPool2d(2)),
    lambda: nn.Sequential(nn.Sequential(NHWCConv(3, 4, 3)), nn.ModuleList()),
])
def test_models_it_does_not_recognise(make) -> None:
    assert blocks_of(make()) is None


def test_a_hook_keeps_the_plain_modules() -> None:
    model = net("bn-pool-relu")
    assert blocks_of(model) is not None
    model.features[1].register_forward_hook(lambda *_: None)
    assert blocks_of(model) is None


def test_float32_meta_gradient_agrees_with_the_plain_modules() -> None:
    model = net("bn-pool-relu").float()
    batch = episodes()
    batch = Episodes(batch.support_x.float(), batch.support_y, batch.query_x.float(),
                     batch.query_y)
    expected = reference(model, batch, 1, lr=0.3)
    meta_backward(model, batch, loss, steps=1, lr=0.3, strategy="loop")
    for (name, p), e in zip(model.named_parameters(), expected, strict=True):
        torch.testing.assert_close(p.grad, e, rtol=1e-3, atol=1e-5, msg=name)


def test_an_in_place_op_after_a_block_and_a_module_used_twice() -> None:
    """A later in-place op (here ReLU6(inplace=True) after the paper's block, whose max-pool
    keeps no output) may change the block's output; a parameter-free module placed twice
    runs twice, as nn.Sequential runs it."""
    torch.manual_seed(0)
    act = nn.LeakyReLU(0.1)
    layers = [NHWCConv(3, 6, 3, padding=1), nn.BatchNorm2d(6, track_running_stats=False),
              nn.ReLU(), nn.MaxPool2d(2), nn.ReLU6(inplace=True), act,
              NHWCConv(6, 6, 3, padding=1), act, nn.BatchNorm2d(6, track_running_stats=False),
              nn.MaxPool2d(2), nn.Flatten(), nn.Linear(6 * 4, 4)]
    model = nn.Sequential(*layers).double()
    blocks = blocks_of(model)
    assert blocks is not None
    assert sum(1 for b in blocks if isinstance(b, tuple) and b[1] is act) == 2
    batch = episodes()
    expected = reference(model, batch, 2, lr=0.3)
    meta_backward(model, batch, loss, steps=2, lr=0.3, strategy="loop")
    for (name, p), e in zip(model.named_parameters(), expected, strict=True):
        torch.testing.assert_close(p.grad, e, rtol=1e-9, atol=1e-12, msg=name)


def test_fused_query_can_be_turned_off() -> None:
    model = net("bn-pool-relu")
    batch = episodes()
    expected = reference(model, batch, 1, lr=0.3)
    meta_backward(model, batch, loss, steps=1, lr=0.3, strategy="loop", fused_query=False)
    for p, e in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(p.grad, e, rtol=1e-9, atol=1e-12)


def test_tied_weights_backward_and_global_hooks_keep_the_plain_modules() -> None:
    conv = NHWCConv(3, 3, 3, padding=1)
    tied = nn.Sequential(conv, nn.BatchNorm2d(3, track_running_stats=False), nn.MaxPool2d(2),
                         conv, nn.BatchNorm2d(3, track_running_stats=False), nn.MaxPool2d(2))
    assert blocks_of(tied) is None
    model = net("bn-pool-relu")
    handle = model.features[1].register_full_backward_hook(lambda *_: None)
    assert blocks_of(model) is None
    handle.remove()
    handle = torch.nn.modules.module.register_module_forward_hook(lambda *_: None)
    try:
        assert blocks_of(model) is None
    finally:
        handle.remove()
    assert blocks_of(model) is not None
