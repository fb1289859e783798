"""Meta-SGD: meta-gradients against a float64 reference, strategies, state, learning."""

from __future__ import annotations

import copy
from functools import partial

import algorithm_helpers as helpers
import pytest
import torch
from torch import Tensor

import autometa_plugins.metasgd
from autometa import Episodes
from autometa.trial import evaluate
from autometa_plugins.metasgd.algorithm import MetaSGD
from autometa_plugins.mlp.model import MLP
from autometa_plugins.sinusoid.task import Sinusoid

IN, HIDDEN, OUT = 3, 8, 4  # a small network; OUT doubles as the number of classes
#: Learning tests fix the strategy ("auto"'s rule takes vmap for an MLP too).
VMAP = "vmap"

_Stub = partial(helpers.StubTask, input_shape=(IN,), output_size=OUT)
#: float64 by default; tanh features (second-order terms of the meta-gradient exercised).
_network = partial(helpers.small_network, IN, HIDDEN, OUT)
_episodes = partial(helpers.random_episodes, in_size=IN, out=OUT)


# --- the reference: explicit weight tensors, one task at a time, torch.autograd.grad ---

def _forward(w: list[Tensor], x: Tensor) -> Tensor:
    w1, b1, w2, b2 = w
    return torch.tanh(x @ w1.T + b1) @ w2.T + b2


def _loss(kind: str, pred: Tensor, y: Tensor) -> Tensor:
    if kind == "regression":
        return ((pred - y) ** 2).mean()
    return -pred.log_softmax(-1)[torch.arange(len(y)), y].mean()


def _reference(kind: str, theta: list[Tensor], alpha: list[Tensor], ep: Episodes,
               steps: int, first_order: bool) -> tuple[Tensor, list[Tensor]]:
    """Mean query loss after ``steps`` Meta-SGD steps, and its gradient w.r.t. theta, alpha."""
    losses = []
    for sx, sy, qx, qy in zip(ep.support_x, ep.support_y, ep.query_x, ep.query_y, strict=True):
        fast = theta
        for _ in range(steps):
            g = torch.autograd.grad(_loss(kind, _forward(fast, sx), sy), fast,
                                    create_graph=not first_order)
            fast = [p - a * gi for p, a, gi in zip(fast, alpha, g, strict=True)]
        losses.append(_loss(kind, _forward(fast, qx), qy))
    total = torch.stack(losses).mean()
    return total, list(torch.autograd.grad(total, [*theta, *alpha]))


def _random_rates(algo: MetaSGD) -> None:
    """Distinct rates per entry (the paper's U[0.005, 0.1]), so a mixed-up rate shows."""
    with torch.no_grad():
        for lr in algo.inner_lr.values():
            lr.uniform_(0.005, 0.1)


def _rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm())


NAMES = ["features.0.weight", "features.0.bias", "head.weight", "head.bias"]


@pytest.mark.parametrize("first_order", [False, True], ids=["second-order", "first-order"])
@pytest.mark.parametrize("kind", ["regression", "classification"])
def test_meta_gradient_matches_float64_reference(kind, first_order):
    torch.manual_seed(0)
    model = _network()
    algo = MetaSGD(model, _Stub(kind), inner_steps=2, first_order=first_order,
                   strategy="vmap")
    _random_rates(algo)
    params = dict(model.named_parameters())
    theta = [params[n].detach().clone().requires_grad_() for n in NAMES]
    alpha = [algo.inner_lr[n].detach().clone().requires_grad_() for n in NAMES]
    episodes = _episodes(kind)

    ref_loss, ref_grads = _reference(kind, theta, alpha, episodes, 2, first_order)
    loss = algo.meta_step(episodes)  # leaves the meta-gradient in .grad

    assert loss == pytest.approx(ref_loss.item(), rel=1e-12)
    got = [params[n].grad for n in NAMES] + [algo.inner_lr[n].grad for n in NAMES]
    for name, g, r in zip(NAMES * 2, got, ref_grads, strict=True):
        assert _rel(g, r) < 1e-6, name


def test_meta_step_updates_rates_and_weights():
    torch.manual_seed(0)
    algo = MetaSGD(_network(), _Stub("regression"), init_inner_lr=0.05)
    before = {n: lr.clone() for n, lr in algo.inner_lr.items()}
    weights = copy.deepcopy(algo.model.state_dict())
    algo.meta_step(_episodes("regression"))
    assert all(not torch.equal(algo.inner_lr[n], before[n]) for n in NAMES)
    assert all(torch.equal(before[n], torch.full_like(before[n], 0.05)) for n in NAMES)
    assert all(not torch.equal(algo.model.state_dict()[n], weights[n]) for n in NAMES)


@pytest.mark.parametrize("first_order", [False, True], ids=["second-order", "first-order"])
def test_vmap_and_loop_agree(first_order):
    torch.manual_seed(0)
    model = _network(torch.float32)
    algos = [MetaSGD(copy.deepcopy(model), _Stub("classification"), inner_steps=2,
                     first_order=first_order, strategy=s) for s in ("vmap", "loop")]
    _random_rates(algos[0])
    algos[1].load_state_dict(algos[0].state_dict())
    episodes = _episodes("classification", dtype=torch.float32)

    preds = [a.adapt_and_predict(episodes) for a in algos]
    torch.testing.assert_close(preds[0], preds[1], rtol=1e-5, atol=1e-6)
    losses = [a.meta_step(episodes) for a in algos]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    grads = [[*(p.grad for p in a.model.parameters()), *(lr.grad for lr in a.inner_lr.values())]
             for a in algos]
    for g_vmap, g_loop in zip(*grads, strict=True):
        torch.testing.assert_close(g_vmap, g_loop, rtol=1e-5, atol=1e-6)


def test_adapt_and_predict_keeps_no_graph_and_no_state():
    torch.manual_seed(0)
    algo = MetaSGD(_network(), _Stub("regression"))
    state = copy.deepcopy(algo.state_dict())
    pred = algo.adapt_and_predict(_episodes("regression"))
    assert pred.shape == (3, 6, OUT) and not pred.requires_grad
    torch.testing.assert_close(algo.state_dict(), state, rtol=0, atol=0)


def test_state_dict_round_trip_includes_the_rates(tmp_path):
    task = Sinusoid(val_episodes=4, test_episodes=4, eval_queries=10)
    torch.manual_seed(0)
    trained = MetaSGD(MLP().build(task.spec), task, meta_lr=0.01)
    helpers.meta_train_steps(trained, task, 5)
    torch.save(trained.state_dict(), tmp_path / "state.pt")

    torch.manual_seed(1)  # another initialisation, and other initial rates
    restored = MetaSGD(MLP().build(task.spec), task, init_inner_lr=0.07)
    restored.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    episodes = task.meta_val()
    assert torch.equal(restored.adapt_and_predict(episodes), trained.adapt_and_predict(episodes))

    # The rates are part of what is restored: the model alone predicts differently.
    model_only = MetaSGD(MLP().build(task.spec), task, init_inner_lr=0.07)
    model_only.model.load_state_dict(trained.state_dict()["model"])
    assert not torch.allclose(model_only.adapt_and_predict(episodes),
                              trained.adapt_and_predict(episodes))


def test_load_state_dict_names_a_mismatch():
    torch.manual_seed(0)
    algo = MetaSGD(_network(), _Stub("regression"))
    state = algo.state_dict()
    del state["inner_lr"]["head.bias"]
    with pytest.raises(KeyError, match="another model"):
        algo.load_state_dict(state)


def test_learns_sinusoid():
    task = Sinusoid(val_episodes=4, test_episodes=100, eval_queries=20)
    torch.manual_seed(0)
    algo = MetaSGD(MLP().build(task.spec), task, meta_batch_size=10, strategy=VMAP)
    untrained = float(evaluate(algo, task.meta_test(), task).mean())
    helpers.meta_train_steps(algo, task, 600)
    trained = float(evaluate(algo, task.meta_test(), task).mean())
    # Zero-mean predictions would score ~4.2 (mean A^2 / 2); meta-learning gets well below.
    assert trained < 0.3 * untrained, (untrained, trained)


def test_search_space_declares_keyword_arguments_with_defaults_in_range():
    helpers.assert_search_space_defaults_in_range(MetaSGD, "metasgd")


def test_runs_as_a_plugin_in_a_trial(tmp_path):
    helpers.assert_runs_in_a_trial(tmp_path, "metasgd", autometa_plugins.metasgd, MetaSGD,
                                   Sinusoid(val_episodes=4, test_episodes=4, eval_queries=10),
                                   {"meta_batch_size": 4, "strategy": "vmap"})
