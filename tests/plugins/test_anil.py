"""ANIL: meta-gradients against a hand-written float64 reference, strategies, learning."""

from __future__ import annotations

import copy
from functools import partial

import algorithm_helpers as helpers
import pytest
import torch
from torch import Tensor

import autometa_plugins.anil
from autometa import Episodes
from autometa.trial import evaluate
from autometa_plugins.anil.algorithm import ANIL
from autometa_plugins.digits.task import Digits
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

def _forward(w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, x: Tensor) -> Tensor:
    return torch.tanh(x @ w1.T + b1) @ w2.T + b2


def _loss(kind: str, pred: Tensor, y: Tensor) -> Tensor:
    if kind == "regression":
        return ((pred - y) ** 2).mean()
    return -pred.log_softmax(-1)[torch.arange(len(y)), y].mean()


def _reference(kind: str, theta: list[Tensor], ep: Episodes, lr: float, steps: int,
               first_order: bool) -> tuple[Tensor, list[Tensor]]:
    """Mean query loss after ``steps`` SGD steps on the head (w2, b2), and its gradient
    with respect to every parameter."""
    w1, b1, w2, b2 = theta
    losses = []
    for sx, sy, qx, qy in zip(ep.support_x, ep.support_y, ep.query_x, ep.query_y, strict=True):
        head = [w2, b2]
        for _ in range(steps):
            g = torch.autograd.grad(_loss(kind, _forward(w1, b1, *head, sx), sy), head,
                                    create_graph=not first_order)
            head = [p - lr * gi for p, gi in zip(head, g, strict=True)]
        losses.append(_loss(kind, _forward(w1, b1, *head, qx), qy))
    total = torch.stack(losses).mean()
    return total, list(torch.autograd.grad(total, theta))


def _rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm())


NAMES = ["features.0.weight", "features.0.bias", "head.weight", "head.bias"]


@pytest.mark.parametrize("first_order", [False, True], ids=["second-order", "first-order"])
@pytest.mark.parametrize("kind", ["regression", "classification"])
def test_meta_gradient_matches_float64_reference(kind, first_order):
    torch.manual_seed(0)
    model = _network()
    algo = ANIL(model, _Stub(kind), inner_lr=0.3, inner_steps=2, first_order=first_order,
                strategy="vmap")
    params = dict(model.named_parameters())
    theta = [params[n].detach().clone().requires_grad_() for n in NAMES]
    episodes = _episodes(kind)

    ref_loss, ref_grads = _reference(kind, theta, episodes, 0.3, 2, first_order)
    loss = algo.meta_step(episodes)  # leaves the meta-gradient in .grad

    assert loss == pytest.approx(ref_loss.item(), rel=1e-12)
    for name, r in zip(NAMES, ref_grads, strict=True):
        assert _rel(params[name].grad, r) < 1e-6, name


@pytest.mark.parametrize("first_order", [False, True], ids=["second-order", "first-order"])
def test_vmap_and_loop_agree(first_order):
    torch.manual_seed(0)
    model = _network(torch.float32)
    algos = [ANIL(copy.deepcopy(model), _Stub("classification"), inner_lr=0.3, inner_steps=2,
                  first_order=first_order, strategy=s) for s in ("vmap", "loop")]
    episodes = _episodes("classification", dtype=torch.float32)

    preds = [a.adapt_and_predict(episodes) for a in algos]
    torch.testing.assert_close(preds[0], preds[1], rtol=1e-5, atol=1e-6)
    losses = [a.meta_step(episodes) for a in algos]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    for p_vmap, p_loop in zip(algos[0].model.parameters(), algos[1].model.parameters(),
                              strict=True):
        torch.testing.assert_close(p_vmap.grad, p_loop.grad, rtol=1e-5, atol=1e-6)


def test_adapt_and_predict_is_sgd_on_the_head_alone():
    """Evaluation: hand-written SGD steps on the head, body fixed; the state is unchanged."""
    torch.manual_seed(0)
    model = _network()
    algo = ANIL(model, _Stub("regression"), inner_lr=0.3, inner_steps=3)
    state = copy.deepcopy(algo.state_dict())
    episodes = _episodes("regression")
    pred = algo.adapt_and_predict(episodes)
    assert pred.shape == (3, 6, OUT) and not pred.requires_grad
    torch.testing.assert_close(algo.state_dict(), state, rtol=0, atol=0)

    p = {n: t.detach() for n, t in model.named_parameters()}
    for i, (sx, sy, qx) in enumerate(zip(episodes.support_x, episodes.support_y,
                                         episodes.query_x, strict=True)):
        head = [p["head.weight"].clone().requires_grad_(), p["head.bias"].clone().requires_grad_()]
        for _ in range(3):
            loss = _loss("regression", _forward(p["features.0.weight"], p["features.0.bias"],
                                                *head, sx), sy)
            head = [(h - 0.3 * g).detach().requires_grad_()
                    for h, g in zip(head, torch.autograd.grad(loss, head), strict=True)]
        expected = _forward(p["features.0.weight"], p["features.0.bias"], *head, qx)
        torch.testing.assert_close(pred[i], expected, rtol=1e-12, atol=1e-12)


def test_learns_sinusoid():
    task = Sinusoid(val_episodes=4, test_episodes=100, eval_queries=20)
    torch.manual_seed(0)
    algo = ANIL(MLP().build(task.spec), task, inner_lr=0.1, meta_batch_size=10,
                strategy=VMAP)
    untrained = float(evaluate(algo, task.meta_test(), task).mean())
    helpers.meta_train_steps(algo, task, 800)
    trained = float(evaluate(algo, task.meta_test(), task).mean())
    assert trained < 0.5 * untrained, (untrained, trained)


def test_learns_digits_5way_1shot():
    task = Digits(ways=5, shots=1, queries=15, val_episodes=4, test_episodes=200)
    torch.manual_seed(0)
    algo = ANIL(MLP().build(task.spec), task, inner_lr=0.4, inner_steps=5, meta_batch_size=10,
                strategy=VMAP)
    untrained = float(evaluate(algo, task.meta_test(), task).mean())
    # Short on purpose: digits has only 5 meta-train classes, and longer meta-training
    # overfits them (the meta-train loss goes to 0 while held-out accuracy falls back).
    helpers.meta_train_steps(algo, task, 150)
    trained = float(evaluate(algo, task.meta_test(), task).mean())
    assert trained > 0.4 and trained > untrained + 0.1, (untrained, trained)


def test_search_space_declares_keyword_arguments_with_defaults_in_range():
    helpers.assert_search_space_defaults_in_range(ANIL, "anil")


def test_runs_as_a_plugin_in_a_trial(tmp_path):
    helpers.assert_runs_in_a_trial(tmp_path, "anil", autometa_plugins.anil, ANIL,
                                   Sinusoid(val_episodes=4, test_episodes=4, eval_queries=10),
                                   {"meta_batch_size": 4, "strategy": "vmap"})
