"""The fused BatchNorm + max-pool of an episode's passes (autometa.fused_blocks): the same
meta-gradients as the plain modules in float64, taken only where it is safe."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from autometa import Backbone, Episodes
from autometa.fused_blocks import DifferentiableBatchNormMaxPool, blocks_of, forward
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
                             loss, steps=1, lr=0.3, strategy="loop", fused=True)
    assert "BatchNormMaxPoolBackward" in nodes(pred)
    first = torch.autograd.grad(loss(pred, batch.query_y), list(params.values()),
                                create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|inplace"):
        torch.autograd.grad(sum(g.sum() for g in first), list(params.values()))


def test_the_support_pass_runs_the_differentiable_block() -> None:
    """The support loss's gradient is taken with create_graph through the differentiable
    block: its recorded backward (with the statistics' node) is in the prediction's graph."""
    model = net("bn-pool-relu")
    batch = episodes(1)
    pred = adapt_and_predict(model, parameters_of(model), batch.support_x, batch.support_y,
                             batch.query_x, loss, steps=1, lr=0.3, strategy="loop", fused=True)
    assert "_BatchStatisticsBackward" in nodes(pred)


def test_the_differentiable_blocks_third_derivative_against_finite_differences() -> None:
    """Differentiable any number of times: the second derivative's own gradient agrees with
    finite differences (BatchNorm2d's native double backward does not: its third
    derivative fails this same check in torch 2.13)."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 4, 6, 6, generator=g, dtype=torch.float64).contiguous(
        memory_format=torch.channels_last).requires_grad_()
    weight = torch.randn(4, generator=g, dtype=torch.float64).requires_grad_()
    bias = torch.randn(4, generator=g, dtype=torch.float64).requires_grad_()
    probe = torch.randn(3, 4, 3, 3, generator=g, dtype=torch.float64)

    def second(x, weight, bias):
        out = DifferentiableBatchNormMaxPool.apply(x, weight, bias, 1e-5, True)
        first = torch.autograd.grad((out * probe).sum(), (x, weight), create_graph=True)
        return torch.autograd.grad(sum((f * f).sum() for f in first), (x, weight),
                                   create_graph=True)

    assert torch.autograd.gradcheck(second, (x, weight, bias))


@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("size", [(4, 6, 8, 8), (3, 5, 7, 9)])  # odd sides: a row/col unpooled
def test_differentiable_block_matches_the_modules_to_the_second_derivative(
        relu: bool, size: tuple[int, int, int, int]) -> None:
    """Values, gradients and Hessian-vector products of the block equal BatchNorm2d +
    max_pool2d (+ ReLU)'s in float64, with negative scales in some channels."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(*size, generator=g, dtype=torch.float64).contiguous(
        memory_format=torch.channels_last).requires_grad_()
    weight = (torch.rand(size[1], generator=g, dtype=torch.float64) * 3 - 1.5).requires_grad_()
    bias = torch.randn(size[1], generator=g, dtype=torch.float64).requires_grad_()
    probe = torch.randn(size[0], size[1], size[2] // 2, size[3] // 2, generator=g,
                        dtype=torch.float64)
    before = x.detach().clone()

    def plain(x, weight, bias):
        y = F.max_pool2d(F.batch_norm(x, None, None, weight, bias, True, 0.0, 1e-5), 2)
        return torch.relu(y) if relu else y

    def fused(x, weight, bias):
        return DifferentiableBatchNormMaxPool.apply(x, weight, bias, 1e-5, relu)

    results = []
    for fn in (plain, fused):
        out = fn(x, weight, bias)
        first = torch.autograd.grad((out * probe).sum(), (x, weight, bias), create_graph=True)
        # the second derivative along the first gradients squared (a Hessian-vector product)
        second = torch.autograd.grad(sum((f * f).sum() for f in first), (x, weight, bias),
                                     allow_unused=True)  # the bias: only through the mask
        results.append([out, *first, *(torch.zeros_like(t) if s is None else s
                                       for s, t in zip(second, (x, weight, bias), strict=True))])
    for name, a, b in zip(["out", "dx", "dw", "db", "d2x", "d2w", "d2b"], *results, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-12, msg=name)
    assert torch.equal(x.detach(), before)  # nothing written over the input
    torch.autograd.gradgradcheck(fused, (x, weight, bias))


def test_without_fused_the_plain_modules_run() -> None:
    """adapt_and_predict's default keeps every graph differentiable as often as a user
    wants (a Hessian of the meta-loss)."""
    model = net("bn-pool-relu")
    batch = episodes(1)
    pred = adapt_and_predict(model, parameters_of(model), batch.support_x, batch.support_y,
                             batch.query_x, loss, steps=1, lr=0.3, strategy="loop")
    assert not {"BatchNormMaxPoolBackward", "_BatchStatisticsBackward"} & nodes(pred)


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


def test_fusion_can_be_turned_off() -> None:
    model = net("bn-pool-relu")
    batch = episodes()
    expected = reference(model, batch, 1, lr=0.3)
    meta_backward(model, batch, loss, steps=1, lr=0.3, strategy="loop", fused=False)
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
