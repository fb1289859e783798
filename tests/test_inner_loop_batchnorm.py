"""BatchNorm in the inner loop.

Second-order meta-gradients through BatchNorm: the loop is used, vmap is refused (PyTorch's
vmap batching rule for BatchNorm's double backward is wrong, functorch #534; a model such as
conv4 must never train on it silently). BatchNorm with running statistics: every
gradient-based algorithm against float64 references (second half).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from autometa import Backbone, ConfigError, Episodes, Task
from autometa.inner_loop import adapt_and_predict, parameters_of
from autometa.metrics import loss_for


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


# --------------------------------------------------------------------------------------
# BatchNorm with running statistics (track_running_stats=True), in every gradient-based
# algorithm: each training-mode pass updates them, in order; eval mode uses them unchanged
# (autometa.inner_loop's module docstring). References: float64, plain autograd, one
# episode at a time through torch.func.functional_call on a copy of the model, whose
# buffers its own passes update.

SIDE, WAYS = 5, 3
BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


class _Stub(Task):
    """Shapes and loss only; the tests make the episodes."""

    def __init__(self, kind: str = "classification") -> None:
        super().__init__()
        self.kind, self.input_shape, self.output_size = kind, (1, SIDE, SIDE), WAYS

    def sample(self, n_tasks, generator):
        raise NotImplementedError

    def meta_val(self):
        raise NotImplementedError

    def meta_test(self):
        raise NotImplementedError


def _net() -> Backbone:
    """conv -> BatchNorm2d with running statistics (non-trivial ones) -> tanh -> linear."""
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(2, momentum=0.3)
    net = Backbone(nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), bn, nn.Tanh(), nn.Flatten()),
                   nn.Linear(2 * SIDE * SIDE, WAYS)).double()
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor([0.3, -0.2]))
        bn.running_var.copy_(torch.tensor([2.0, 0.5]))
    return net


def _batch(kind: str = "classification", tasks: int = 3) -> Episodes:
    g = torch.Generator().manual_seed(2)

    def y(n: int) -> torch.Tensor:
        if kind == "classification":
            return torch.randint(0, WAYS, (tasks, n), generator=g)
        return torch.randn(tasks, n, WAYS, generator=g, dtype=torch.float64)

    def x(n: int) -> torch.Tensor:
        return torch.randn(tasks, n, 1, SIDE, SIDE, generator=g, dtype=torch.float64)

    return Episodes(x(4), y(4), x(5), y(5))


def _stats(net: nn.Module) -> list[torch.Tensor]:
    bn = net.features[1]
    return [getattr(bn, name).clone() for name in BUFFERS]


def _assert_same(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def _maml_reference(net: nn.Module, batch: Episodes, kind: str, *, lr, steps: int,
                    first_order: bool, head_only: bool
                    ) -> tuple[float, list[torch.Tensor]]:
    """Query loss after adaptation, and its gradient w.r.t. the weights (and rates)."""
    weights = dict(net.named_parameters())
    rates = lr if isinstance(lr, dict) else {n: lr for n in weights}
    adapted = [n for n in weights if not head_only or n.startswith("head.")]
    losses = []
    for t in range(len(batch)):
        fast = dict(weights)
        for _ in range(steps):
            support = loss_for(kind, functional_call(net, fast, (batch.support_x[t],)),
                               batch.support_y[t])
            grads = torch.autograd.grad(support, [fast[n] for n in adapted],
                                        create_graph=not first_order)
            fast.update({n: fast[n] - rates[n] * g
                         for n, g in zip(adapted, grads, strict=True)})
        losses.append(loss_for(kind, functional_call(net, fast, (batch.query_x[t],)),
                               batch.query_y[t]))
    total = torch.stack(losses).mean()
    extra = list(lr.values()) if isinstance(lr, dict) else []
    return float(total.detach()), list(torch.autograd.grad(total, [*weights.values(), *extra]))


def _eval_reference(net: nn.Module, batch: Episodes, kind: str, *, lr: float, steps: int,
                    head_only: bool = False) -> torch.Tensor:
    """Eval-mode adaptation (SGD on the support set) and query predictions, per episode."""
    net.eval()
    preds = []
    for t in range(len(batch)):
        fast = {n: p.detach().clone().requires_grad_(not head_only or n.startswith("head."))
                for n, p in net.named_parameters()}
        for _ in range(steps):
            wrt = [p for p in fast.values() if p.requires_grad]
            support = loss_for(kind, functional_call(net, fast, (batch.support_x[t],)),
                               batch.support_y[t])
            grads = iter(torch.autograd.grad(support, wrt))
            fast = {n: (p - lr * next(grads)).detach().requires_grad_() if p.requires_grad
                    else p for n, p in fast.items()}
        with torch.no_grad():
            preds.append(functional_call(net, fast, (batch.query_x[t],)))
    return torch.stack(preds)


def _maml_family(name: str, first_order: bool, strategy: str):
    from autometa_plugins.anil.algorithm import ANIL
    from autometa_plugins.maml.algorithm import MAML
    from autometa_plugins.metasgd.algorithm import MetaSGD

    options = {"inner_steps": 2, "first_order": first_order, "strategy": strategy,
               "meta_batch_size": 3}
    if name == "metasgd":
        return MetaSGD(_net(), _Stub(), init_inner_lr=0.2, **options)
    return {"maml": MAML, "anil": ANIL}[name](_net(), _Stub(), inner_lr=0.2, **options)


@pytest.mark.parametrize("strategy", ["auto", "loop"])
@pytest.mark.parametrize("first_order", [False, True], ids=["second-order", "first-order"])
@pytest.mark.parametrize("name", ["maml", "metasgd", "anil"])
def test_meta_step_with_running_statistics_matches_the_reference(name, first_order, strategy):
    """Loss, meta-gradients (of the weights and Meta-SGD's rates) and the running statistics
    after one meta-step equal the reference's; two threads change nothing."""
    algo = _maml_family(name, first_order, strategy)
    reference = copy.deepcopy(algo.model)
    rates = ({n: r.detach().clone().requires_grad_() for n, r in algo.inner_lr.items()}
             if name == "metasgd" else 0.2)
    want_loss, want_grads = _maml_reference(reference, _batch(), "classification", lr=rates,
                                            steps=2, first_order=first_order,
                                            head_only=name == "anil")
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        loss = algo.meta_step(_batch())
    finally:
        torch.set_num_threads(before)
    extra = list(algo.inner_lr.values()) if name == "metasgd" else []
    assert loss == pytest.approx(want_loss, rel=1e-12)
    for p, want in zip([*algo.model.parameters(), *extra], want_grads, strict=True):
        torch.testing.assert_close(p.grad, want, rtol=1e-7, atol=1e-12)
    _assert_same(_stats(algo.model), _stats(reference))
    assert int(_stats(algo.model)[2]) == 3 * 3  # 3 episodes x (2 support passes + 1 query)


@pytest.mark.parametrize("name", ["maml", "metasgd", "anil"])
def test_evaluation_uses_the_running_statistics_and_leaves_them(name):
    """Eval mode (trial.evaluate): adaptation and prediction normalise with the running
    statistics, which stay as they were."""
    algo = _maml_family(name, False, "auto")
    algo.model.eval()
    before = _stats(algo.model)
    reference = copy.deepcopy(algo.model)
    if name == "metasgd":  # one rate per entry, all equal to the initial 0.2 here
        assert all(bool((r == 0.2).all()) for r in algo.inner_lr.values())
    pred = algo.adapt_and_predict(_batch())
    want = _eval_reference(reference, _batch(), "classification", lr=0.2, steps=2,
                           head_only=name == "anil")
    torch.testing.assert_close(pred, want, rtol=1e-9, atol=1e-12)
    _assert_same(_stats(algo.model), before)


@pytest.mark.parametrize("first_order", [False, True])
def test_vmap_is_refused_where_a_pass_writes_running_statistics(first_order):
    algo = _maml_family("maml", first_order, "vmap")
    with pytest.raises(ConfigError, match="strategy 'vmap' cannot update BatchNorm running "
                                          "statistics .* use 'loop' or 'auto'"):
        algo.meta_step(_batch())
    algo.model.eval()  # nothing is written in eval mode: vmap serves, as the loop does
    torch.testing.assert_close(algo.adapt_and_predict(_batch()),
                               _eval_reference(algo.model, _batch(), "classification", lr=0.2,
                                               steps=2), rtol=1e-9, atol=1e-12)


def test_reptile_step_with_running_statistics_matches_the_reference():
    """Reptile: the logged loss, the new weights and the running statistics (each task's
    pass before adaptation, then each task's inner steps, in order)."""
    from autometa_plugins.reptile.algorithm import Reptile

    algo = Reptile(_net(), _Stub(), inner_lr=0.1, inner_steps=2, outer_lr=0.5)
    reference = copy.deepcopy(algo.model)
    batch = _batch()
    x = torch.cat([batch.support_x, batch.query_x], 1)
    y = torch.cat([batch.support_y, batch.query_y], 1)
    theta = {n: p.detach().clone() for n, p in reference.named_parameters()}
    with torch.no_grad():
        want_loss = torch.stack([loss_for("classification",
                                          functional_call(reference, theta, (x[t],)), y[t])
                                 for t in range(len(x))]).mean()
    phis = []
    for t in range(len(x)):
        w = {n: p.clone().requires_grad_() for n, p in theta.items()}
        for _ in range(2):
            grads = torch.autograd.grad(
                loss_for("classification", functional_call(reference, w, (x[t],)), y[t]),
                list(w.values()))
            w = {n: (p - 0.1 * g).detach().requires_grad_()
                 for (n, p), g in zip(w.items(), grads, strict=True)}
        phis.append(w)

    loss = algo.meta_step(batch)

    assert loss == pytest.approx(float(want_loss), rel=1e-12)
    for n, p in algo.model.named_parameters():
        mean_phi = torch.stack([phi[n].detach() for phi in phis]).mean(0)
        torch.testing.assert_close(p.detach(), theta[n] + 0.5 * (mean_phi - theta[n]),
                                   rtol=1e-9, atol=1e-12)
    _assert_same(_stats(algo.model), _stats(reference))
    assert int(_stats(algo.model)[2]) == 3 * (1 + 2)
    with pytest.raises(ConfigError, match="running statistics"):
        Reptile(_net(), _Stub(), strategy="vmap").meta_step(batch)
    algo.model.eval()
    before = _stats(algo.model)
    want = _eval_reference(copy.deepcopy(algo.model), batch, "classification", lr=0.1,
                           steps=algo.eval_steps)
    torch.testing.assert_close(algo.adapt_and_predict(batch), want, rtol=1e-9, atol=1e-12)
    _assert_same(_stats(algo.model), before)


def test_finetune_all_with_running_statistics_matches_the_reference():
    """The fine-tuning baseline adapting the whole network (regression): training passes
    update the statistics as plain training does; fine-tuning uses them, unchanged."""
    from autometa_plugins.finetune.algorithm import FineTune

    algo = FineTune(_net(), _Stub("regression"), finetune="all", finetune_steps=3,
                    finetune_lr=0.05, momentum=0.0, weight_decay=0.0, batch_tasks=3)
    reference = copy.deepcopy(algo.model)
    batch = _batch("regression")
    x = torch.cat([batch.support_x, batch.query_x], 1).flatten(0, 1)
    y = torch.cat([batch.support_y, batch.query_y], 1).flatten(0, 1)
    want_loss = loss_for("regression", reference(x), y)
    want_grads = torch.autograd.grad(want_loss, list(reference.parameters()))
    loss = algo.meta_step(batch)
    assert loss == pytest.approx(want_loss.item(), rel=1e-12)
    for p, want in zip(algo.model.parameters(), want_grads, strict=True):
        torch.testing.assert_close(p.grad, want, rtol=1e-9, atol=1e-12)
    _assert_same(_stats(algo.model), _stats(reference))

    before = _stats(algo.model)
    want = _eval_reference(copy.deepcopy(algo.model), batch, "regression", lr=0.05, steps=3)
    torch.testing.assert_close(algo.adapt_and_predict(batch), want, rtol=1e-9, atol=1e-12)
    _assert_same(_stats(algo.model), before)
    assert algo.model.training  # put back as it was


def test_protonet_with_running_statistics_updates_them_per_embedded_set():
    """ProtoNet embeds each episode's support set, then its query set, as batches of their
    own: two training-mode passes per episode, in order; vmap is refused."""
    from autometa_plugins.protonet.algorithm import ProtoNet

    algo = ProtoNet(_net(), _Stub(), meta_batch_size=3)
    reference = copy.deepcopy(algo.model)
    batch = _batch()
    for t in range(len(batch)):
        reference.features(batch.support_x[t])
        reference.features(batch.query_x[t])
    algo.meta_step(batch)
    _assert_same(_stats(algo.model), _stats(reference))
    with pytest.raises(ConfigError, match="running statistics"):
        ProtoNet(_net(), _Stub(), strategy="vmap").meta_step(batch)
