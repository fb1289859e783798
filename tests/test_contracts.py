"""The three contracts on the walking skeleton's plugins, and MAML against a float64 reference."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from autometa import Backbone, Episodes
from autometa.inner_loop import adapt_and_predict, parameters_of
from autometa.trial import evaluate
from autometa_plugins.conv4.model import Conv4
from autometa_plugins.digits.task import Digits
from autometa_plugins.maml.algorithm import MAML
from autometa_plugins.mlp.model import MLP
from autometa_plugins.sinusoid.task import Sinusoid

SMALL = {"val_episodes": 8, "test_episodes": 8, "eval_queries": 7}


def same(a: Episodes, b: Episodes) -> bool:
    return all(torch.equal(getattr(a, f), getattr(b, f))
               for f in ("support_x", "support_y", "query_x", "query_y"))


@pytest.mark.parametrize(("task_cls", "params"), [
    (Sinusoid, {"shots": 5, "queries": 3, **SMALL}),
    (Digits, {"ways": 3, "shots": 2, "queries": 4, "val_episodes": 6, "test_episodes": 6}),
])
def test_task_contract(task_cls: type, params: dict) -> None:
    """Shapes follow the spec; meta-val/test are fixed by the seed; meta-train follows the rng."""
    task = task_cls(seed=1, **params)
    twin, other = task_cls(seed=1, **params), task_cls(seed=2, **params)
    for split in ("meta_val", "meta_test"):
        assert same(getattr(task, split)(), getattr(task, split)())
        assert same(getattr(task, split)(), getattr(twin, split)())
        assert not same(getattr(task, split)(), getattr(other, split)())
    batch = task.sample(4, torch.Generator().manual_seed(0))
    assert batch.support_x.shape[0] == 4
    assert tuple(batch.support_x.shape[2:]) == task.input_shape
    if task.kind == "classification":
        assert batch.support_y.dtype == torch.long
        assert int(batch.query_y.max()) < task.output_size
    else:
        assert batch.support_y.shape[-1] == task.output_size
    assert not same(batch, task.sample(4, torch.Generator().manual_seed(1)))


@pytest.mark.parametrize(("source", "task"), [
    (MLP(hidden=16, layers=2), Sinusoid(**SMALL)),
    (Conv4(channels=8), Digits(val_episodes=2, test_episodes=2)),
])
def test_source_contract(source: object, task: object) -> None:
    """A source builds a Backbone (features then head) mapping inputs to outputs."""
    net = source.build(task.spec)
    assert isinstance(net, Backbone)
    x = task.meta_val().support_x[0]
    assert net(x).shape == (x.shape[0], task.output_size)
    assert torch.equal(net(x), net.head(net.features(x)))


def reference_maml_grads(weights: list[torch.Tensor], batch: Episodes, lr: float, steps: int,
                         first_order: bool) -> list[torch.Tensor]:
    """Naive MAML: explicit tensors, one task at a time, torch.autograd.grad(create_graph)."""
    def forward(ws: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        w1, b1, w2, b2 = ws
        return torch.relu(x @ w1.T + b1) @ w2.T + b2

    losses = []
    for sx, sy, qx, qy in zip(batch.support_x, batch.support_y, batch.query_x, batch.query_y,
                              strict=True):
        fast = weights
        for _ in range(steps):
            loss = ((forward(fast, sx) - sy) ** 2).mean()
            grads = torch.autograd.grad(loss, fast, create_graph=not first_order)
            fast = [w - lr * g for w, g in zip(fast, grads, strict=True)]
        losses.append(((forward(fast, qx) - qy) ** 2).mean())
    return list(torch.autograd.grad(torch.stack(losses).mean(), weights))


@pytest.mark.parametrize("strategy", ["vmap", "loop"])
@pytest.mark.parametrize(("steps", "first_order"), [(1, False), (3, False), (2, True)])
def test_maml_meta_gradient_matches_float64_reference(strategy: str, steps: int,
                                                      first_order: bool) -> None:
    """MAML's meta-gradient equals the naive reference within 1e-6 relative error."""
    torch.manual_seed(0)
    task = Sinusoid(shots=5, queries=4, **SMALL)
    batch = task.sample(3, torch.Generator().manual_seed(0))
    batch = Episodes(*(t.double() for t in (batch.support_x, batch.support_y,
                                             batch.query_x, batch.query_y)))
    net = MLP(hidden=8, layers=1).build(task.spec).double()
    pred = adapt_and_predict(net, parameters_of(net), batch.support_x, batch.support_y,
                             batch.query_x, task.loss, steps=steps, lr=0.1,
                             first_order=first_order, strategy=strategy)
    task.loss(pred, batch.query_y).backward()
    linear1, linear2 = net.features[1], net.head
    weights = [p.detach().clone().requires_grad_() for p in
               (linear1.weight, linear1.bias, linear2.weight, linear2.bias)]
    expected = reference_maml_grads(weights, batch, 0.1, steps, first_order)
    got = [linear1.weight.grad, linear1.bias.grad, linear2.weight.grad, linear2.bias.grad]
    for g, e in zip(got, expected, strict=True):
        assert g is not None
        assert torch.linalg.norm(g - e) <= 1e-6 * torch.linalg.norm(e)


def test_maml_state_round_trip_and_adaptation_leave_no_trace() -> None:
    """adapt_and_predict does not change the meta-trained state; state_dict round-trips."""
    torch.manual_seed(0)
    task = Sinusoid(**SMALL)
    algo = MAML(MLP().build(task.spec), task, meta_batch_size=4)
    algo.meta_step(task.sample(4, torch.Generator().manual_seed(0)))
    before = {k: v.clone() for k, v in algo.model.state_dict().items()}
    scores = evaluate(algo, task.meta_test(), task)
    assert all(torch.equal(before[k], v) for k, v in algo.model.state_dict().items())
    buffer = io.BytesIO()
    torch.save(algo.state_dict(), buffer)
    buffer.seek(0)
    fresh = MAML(MLP().build(task.spec), task)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    assert torch.equal(evaluate(fresh, task.meta_test(), task), scores)


def test_maml_learns_the_sinusoid() -> None:
    """A short MAML run beats the un-meta-trained model on meta-test by a clear margin."""
    torch.manual_seed(0)
    task = Sinusoid(**SMALL | {"test_episodes": 100})
    algo = MAML(MLP().build(task.spec), task, meta_batch_size=10, meta_lr=0.005)
    untrained = float(evaluate(algo, task.meta_test(), task).mean())
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        algo.meta_step(task.sample(10, g))
    trained = float(evaluate(algo, task.meta_test(), task).mean())
    assert trained < 0.6 * untrained, (trained, untrained)


def test_backbone_forward_is_head_of_features() -> None:
    """Backbone composes its two parts."""
    net = Backbone(nn.Linear(3, 4), nn.Linear(4, 2))
    x = torch.randn(5, 3)
    assert torch.equal(net(x), net.head(net.features(x)))
