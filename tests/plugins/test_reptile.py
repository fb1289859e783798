"""Reptile: the meta-update against its closed form and a hand-written loop, strategies,
evaluation, learning."""

from __future__ import annotations

import copy
from functools import partial

import algorithm_helpers as helpers
import pytest
import torch
from torch import Tensor, nn

import autometa_plugins.reptile
from autometa import Episodes
from autometa.trial import evaluate
from autometa_plugins.digits.task import Digits
from autometa_plugins.mlp.model import MLP
from autometa_plugins.reptile.algorithm import Reptile
from autometa_plugins.sinusoid.task import Sinusoid

IN, HIDDEN, OUT = 3, 8, 4  # a small network; OUT doubles as the number of classes
#: Learning tests fix the strategy ("auto"'s rule takes vmap for an MLP too).
VMAP = "vmap"

_Stub = partial(helpers.StubTask, input_shape=(IN,), output_size=OUT)
_network = partial(helpers.small_network, IN, HIDDEN, OUT)  # float64 by default
_episodes = partial(helpers.random_episodes, in_size=IN, out=OUT)


# --- the reference: explicit weight tensors, one task at a time, torch.autograd.grad ---

NAMES = ["features.0.weight", "features.0.bias", "head.weight", "head.bias"]


def _forward(w: list[Tensor], x: Tensor) -> Tensor:
    w1, b1, w2, b2 = w
    return torch.tanh(x @ w1.T + b1) @ w2.T + b2


def _loss(kind: str, pred: Tensor, y: Tensor) -> Tensor:
    if kind == "regression":
        return ((pred - y) ** 2).mean()
    return -pred.log_softmax(-1)[torch.arange(len(y)), y].mean()


def _grad(kind: str, w: list[Tensor], x: Tensor, y: Tensor) -> list[Tensor]:
    w = [t.detach().requires_grad_() for t in w]
    return list(torch.autograd.grad(_loss(kind, _forward(w, x), y), w))


def _sgd(kind: str, w: list[Tensor], x: Tensor, y: Tensor, lr: float, steps: int) -> list[Tensor]:
    for _ in range(steps):
        w = [t - lr * g for t, g in zip(w, _grad(kind, w, x, y), strict=True)]
    return w


def _weights(model: nn.Module) -> list[Tensor]:
    state = model.state_dict()
    return [state[n].clone() for n in NAMES]


def _task_data(ep: Episodes) -> tuple[Tensor, Tensor]:
    """Support and query together: what the inner loop trains on."""
    return torch.cat([ep.support_x, ep.query_x], 1), torch.cat([ep.support_y, ep.query_y], 1)


@pytest.mark.parametrize("kind", ["regression", "classification"])
def test_one_inner_step_is_the_closed_form(kind):
    """k = 1: theta - epsilon * alpha * mean_i grad L_i(theta) (joint training)."""
    torch.manual_seed(0)
    algo = Reptile(_network(), _Stub(kind), inner_lr=0.1, inner_steps=1, outer_lr=0.7)
    theta = _weights(algo.model)
    episodes = _episodes(kind)
    x, y = _task_data(episodes)
    grads = [_grad(kind, theta, xi, yi) for xi, yi in zip(x, y, strict=True)]
    mean_grad = [torch.stack(g).mean(0) for g in zip(*grads, strict=True)]
    expected = [t - 0.7 * 0.1 * g for t, g in zip(theta, mean_grad, strict=True)]

    loss = algo.meta_step(episodes)

    for name, e in zip(NAMES, expected, strict=True):
        torch.testing.assert_close(algo.model.state_dict()[name], e, rtol=1e-12, atol=1e-12)
    # The reported loss: theta's loss on the tasks' data, before adaptation.
    assert loss == pytest.approx(float(torch.stack(
        [_loss(kind, _forward(theta, xi), yi) for xi, yi in zip(x, y, strict=True)]).mean()),
        rel=1e-12)


@pytest.mark.parametrize("strategy", ["vmap", "loop"])
@pytest.mark.parametrize("kind", ["regression", "classification"])
def test_k_steps_match_a_hand_written_loop(kind, strategy):
    """theta + epsilon * mean_i (phi_i - theta), phi_i from k SGD steps on task i."""
    torch.manual_seed(0)
    algo = Reptile(_network(), _Stub(kind), inner_lr=0.2, inner_steps=4, outer_lr=0.3,
                   strategy=strategy)
    theta = _weights(algo.model)
    x, y = _task_data(_episodes(kind))
    phis = [_sgd(kind, theta, xi, yi, 0.2, 4) for xi, yi in zip(x, y, strict=True)]
    mean_phi = [torch.stack(p).mean(0) for p in zip(*phis, strict=True)]
    expected = [t + 0.3 * (p - t) for t, p in zip(theta, mean_phi, strict=True)]

    algo.meta_step(_episodes(kind))

    for name, e in zip(NAMES, expected, strict=True):
        torch.testing.assert_close(algo.model.state_dict()[name], e, rtol=1e-12, atol=1e-12)
        assert algo.model.get_parameter(name).grad is None  # no meta-gradient is built


def test_vmap_and_loop_agree():
    torch.manual_seed(0)
    model = _network(torch.float32)
    algos = [Reptile(copy.deepcopy(model), _Stub("classification"), inner_lr=0.2, inner_steps=3,
                     strategy=s) for s in ("vmap", "loop")]
    episodes = _episodes("classification", dtype=torch.float32)
    preds = [a.adapt_and_predict(episodes) for a in algos]
    torch.testing.assert_close(preds[0], preds[1], rtol=1e-5, atol=1e-6)
    losses = [a.meta_step(episodes) for a in algos]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    torch.testing.assert_close(algos[0].model.state_dict(), algos[1].model.state_dict(),
                               rtol=1e-5, atol=1e-6)


def test_adapt_and_predict_is_sgd_on_the_support_set():
    """``eval_steps`` SGD steps on the support set only, then the query predictions."""
    torch.manual_seed(0)
    algo = Reptile(_network(), _Stub("classification"), inner_lr=0.2, inner_steps=2,
                   eval_steps=7)
    state = copy.deepcopy(algo.state_dict())
    episodes = _episodes("classification")
    pred = algo.adapt_and_predict(episodes)
    assert pred.shape == (3, 6, OUT) and not pred.requires_grad
    torch.testing.assert_close(algo.state_dict(), state, rtol=0, atol=0)
    theta = _weights(algo.model)
    for i in range(len(episodes)):
        phi = _sgd("classification", theta, episodes.support_x[i], episodes.support_y[i], 0.2, 7)
        torch.testing.assert_close(pred[i], _forward(phi, episodes.query_x[i]),
                                   rtol=1e-12, atol=1e-12)


def test_learns_sinusoid():
    task = Sinusoid(val_episodes=4, test_episodes=100, eval_queries=20)
    torch.manual_seed(0)
    algo = Reptile(MLP().build(task.spec), task, strategy=VMAP)
    untrained = float(evaluate(algo, task.meta_test(), task).mean())
    helpers.meta_train_steps(algo, task, 600)
    trained = float(evaluate(algo, task.meta_test(), task).mean())
    assert trained < 0.3 * untrained, (untrained, trained)


def test_learns_digits_5way_1shot():
    task = Digits(ways=5, shots=1, queries=15, val_episodes=4, test_episodes=200)
    torch.manual_seed(0)
    algo = Reptile(MLP().build(task.spec), task, inner_lr=0.1, strategy=VMAP)
    untrained = float(evaluate(algo, task.meta_test(), task).mean())
    helpers.meta_train_steps(algo, task, 300)
    trained = float(evaluate(algo, task.meta_test(), task).mean())
    assert trained > 0.5 and trained > untrained + 0.1, (untrained, trained)


def test_search_space_declares_keyword_arguments_with_defaults_in_range():
    helpers.assert_search_space_defaults_in_range(Reptile, "reptile")


def test_runs_as_a_plugin_in_a_trial(tmp_path):
    helpers.assert_runs_in_a_trial(tmp_path, "reptile", autometa_plugins.reptile, Reptile,
                                   Sinusoid(val_episodes=4, test_episodes=4, eval_queries=10),
                                   {"meta_batch_size": 4, "strategy": "vmap"})
