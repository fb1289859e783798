"""The conv4 source's fast block layout (channels_last, max-pool before ReLU) against the
paper's block (NCHW; conv, BatchNorm, ReLU, max-pool) in float64.

The reference is independent of autometa's inner loop: plain autograd, one episode at a
time, ``create_graph=True`` (second-order MAML, Finn et al. 2017), on an ``nn.Sequential``
of the paper's layers with the same weights.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from autometa import Episodes, TaskSpec
from autometa.inner_loop import adapt_and_predict, meta_backward, parameters_of
from autometa_plugins.conv4.model import ChannelsLastConv2d, Conv4

SPEC = TaskSpec(kind="classification", input_shape=(1, 28, 28), output_size=5)


def paper_conv4(net: nn.Module) -> nn.Sequential:
    """The paper's layer order in NCHW, holding copies of ``net``'s weights."""
    layers: list[nn.Module] = []
    feats = net.features
    for i, m in enumerate(feats):
        if isinstance(m, ChannelsLastConv2d):
            conv = nn.Conv2d(m.in_channels, m.out_channels, 3, padding=1).double()
            conv.load_state_dict(m.state_dict())
            bn = nn.BatchNorm2d(m.out_channels, track_running_stats=False).double()
            bn.load_state_dict(feats[i + 1].state_dict())
            pool = [nn.MaxPool2d(2)] if isinstance(feats[i + 2], nn.MaxPool2d) else []
            layers += [conv, bn, nn.ReLU(), *pool]
    head = nn.Linear(net.head.in_features, net.head.out_features).double()
    head.load_state_dict(net.head.state_dict())
    return nn.Sequential(*layers, nn.Flatten(), head)


def episodes(tasks: int = 3) -> Episodes:
    g = torch.Generator().manual_seed(1)
    return Episodes(torch.rand(tasks, 5, *SPEC.input_shape, generator=g).double(),
                    torch.arange(5).repeat(tasks, 1),
                    torch.rand(tasks, 10, *SPEC.input_shape, generator=g).double(),
                    torch.arange(5).repeat(tasks, 2))


def loss(pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(pred.reshape(-1, pred.shape[-1]), y.reshape(-1))


def reference(net: nn.Module, batch: Episodes, steps: int, lr: float) -> list[torch.Tensor]:
    """Second-order MAML meta-gradient, plain autograd, episode by episode."""
    names, weights = zip(*net.named_parameters(), strict=True)
    losses = []
    for t in range(len(batch)):
        fast = list(weights)
        for _ in range(steps):
            params = dict(zip(names, fast, strict=True))
            support = F.cross_entropy(functional_call(net, params, (batch.support_x[t],)),
                                      batch.support_y[t])
            grads = torch.autograd.grad(support, fast, create_graph=True)
            fast = [w - lr * g for w, g in zip(fast, grads, strict=True)]
        query = functional_call(net, dict(zip(names, fast, strict=True)), (batch.query_x[t],))
        losses.append(F.cross_entropy(query, batch.query_y[t]))
    return list(torch.autograd.grad(torch.stack(losses).mean(), weights))


def test_fast_blocks_compute_the_paper_blocks() -> None:
    torch.manual_seed(0)
    net = Conv4(channels=8).build(SPEC).double()
    with torch.no_grad():  # negative BatchNorm scales too: the swap must hold for any sign
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(-1.5, 1.5)
    x = episodes().query_x[0]
    fast = net.features[0](x)
    assert fast.is_contiguous(memory_format=torch.channels_last)  # on a CPU
    torch.testing.assert_close(net(x), paper_conv4(net)(x), rtol=1e-12, atol=1e-12)


def test_grayscale_batches_run_channels_last_without_copies() -> None:
    """A one-channel batch is already channels_last in memory: the first convolution reads
    it as such, so its (large) output needs no NCHW -> NHWC copy, forward or backward."""
    net = Conv4(channels=8).build(SPEC)
    x = episodes().query_x[0].float()
    with torch.profiler.profile(record_shapes=True) as prof:
        out = net.features[0](x)
        out.backward(torch.ones_like(out))  # a channels_last gradient, as BatchNorm's is
    assert out.is_contiguous(memory_format=torch.channels_last)
    copies = [e.input_shapes for e in prof.events() if e.name == "aten::copy_"]
    assert not [s for s in copies if s and s[0][1:2] == [8]], copies


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("steps", [1, 5])
def test_meta_gradient_equals_the_float64_reference(steps: int, threads: int) -> None:
    """autometa's loop (its default for conv4; on 2 threads the episode workers) on the
    fast blocks gives the paper blocks' second-order meta-gradient."""
    torch.manual_seed(0)
    net = Conv4(channels=8).build(SPEC).double()
    with torch.no_grad():
        net.features[1].weight.uniform_(-1.5, 1.5)
    batch = episodes()
    expected = reference(paper_conv4(net), batch, steps, lr=0.4)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        meta_backward(net, batch, loss,
                      steps=steps, lr=0.4, strategy="auto")
    finally:
        torch.set_num_threads(before)
    for p, e in zip(net.parameters(), expected, strict=True):
        torch.testing.assert_close(p.grad, e, rtol=1e-9, atol=1e-11)


def test_vmap_keeps_the_plain_layout() -> None:
    """Under vmap (first order: allowed with BatchNorm) the blocks run as they are (vmap cannot
    make channels_last) and give the loop's meta-gradient."""
    torch.manual_seed(0)
    net = Conv4(channels=4).build(SPEC).double()
    batch = episodes(2)
    grads = []
    for strategy in ("vmap", "loop"):
        pred = adapt_and_predict(net, parameters_of(net), batch.support_x, batch.support_y,
                                 batch.query_x, loss, steps=1, lr=0.4, first_order=True,
                                 strategy=strategy)
        grads.append(torch.autograd.grad(loss(pred, batch.query_y), list(net.parameters())))
    for v, lo in zip(*grads, strict=True):
        torch.testing.assert_close(v, lo, rtol=1e-9, atol=1e-11)
