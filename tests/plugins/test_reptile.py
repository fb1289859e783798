"""Reptile: the meta-update against its closed form and a hand-written loop, strategies,
evaluation, learning."""

from __future__ import annotations

import copy
import inspect
import math

import pytest
import torch
from torch import Tensor, nn

import autometa_plugins.mlp
import autometa_plugins.reptile
from autometa import Backbone, Episodes, Task, create_host
from autometa.space import check_value
from autometa.trial import TrialPlan, build, evaluate, load_state, meta_train, save_state
from autometa_plugins.digits.task import Digits
from autometa_plugins.mlp.model import MLP
from autometa_plugins.reptile.algorithm import Reptile
from autometa_plugins.sinusoid.task import Sinusoid

IN, HIDDEN, OUT = 3, 8, 4  # a small network; OUT doubles as the number of classes
#: Learning tests fix the strategy: "auto" would first time both strategies on full
#: evaluations, a one-off cost larger than the whole test on a small MLP.
VMAP = "vmap"


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: intra-op threads only add synchronisation (and the CPU is shared)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class _Stub(Task):
    """A task that only defines its kind and shapes; episodes are built by the tests."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind, self.input_shape, self.output_size = kind, (IN,), OUT

    def sample(self, n_tasks, generator):
        raise NotImplementedError

    def meta_val(self):
        raise NotImplementedError

    def meta_test(self):
        raise NotImplementedError


def _network(dtype: torch.dtype = torch.float64) -> Backbone:
    features = nn.Sequential(nn.Linear(IN, HIDDEN), nn.Tanh())
    return Backbone(features, nn.Linear(HIDDEN, OUT)).to(dtype)


def _episodes(kind: str, tasks: int = 3, n_s: int = 5, n_q: int = 6,
              dtype: torch.dtype = torch.float64) -> Episodes:
    g = torch.Generator().manual_seed(1)

    def targets(n: int) -> Tensor:
        if kind == "classification":
            return torch.randint(0, OUT, (tasks, n), generator=g)  # (tasks, n)
        return torch.randn(tasks, n, OUT, generator=g, dtype=dtype)  # (tasks, n, out)

    return Episodes(torch.randn(tasks, n_s, IN, generator=g, dtype=dtype), targets(n_s),
                    torch.randn(tasks, n_q, IN, generator=g, dtype=dtype), targets(n_q))


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
    g = torch.Generator().manual_seed(0)
    for _ in range(600):
        algo.meta_step(task.sample(algo.tasks_per_step, g))
    trained = float(evaluate(algo, task.meta_test(), task).mean())
    assert trained < 0.3 * untrained, (untrained, trained)


def test_learns_digits_5way_1shot():
    task = Digits(ways=5, shots=1, queries=15, val_episodes=4, test_episodes=200)
    torch.manual_seed(0)
    algo = Reptile(MLP().build(task.spec), task, inner_lr=0.1, strategy=VMAP)
    untrained = float(evaluate(algo, task.meta_test(), task).mean())
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        algo.meta_step(task.sample(algo.tasks_per_step, g))
    trained = float(evaluate(algo, task.meta_test(), task).mean())
    assert trained > 0.5 and trained > untrained + 0.1, (untrained, trained)


def test_search_space_declares_keyword_arguments_with_defaults_in_range():
    defaults = {name: p.default for name, p in inspect.signature(Reptile).parameters.items()
                if p.kind is inspect.Parameter.KEYWORD_ONLY}
    for name, param in Reptile.search_space().items():
        assert name in defaults, name
        check_value(f"reptile.{name}", param, defaults[name])  # raises ConfigError if outside


def test_runs_as_a_plugin_in_a_trial(tmp_path):
    host = create_host(entry_points=False,
                       plugins={"reptile": autometa_plugins.reptile, "mlp": autometa_plugins.mlp})
    assert host.get("algorithm", "reptile").load() is Reptile
    task = Sinusoid(val_episodes=4, test_episodes=4, eval_queries=10)
    plan = TrialPlan("reptile", "mlp", {"meta_batch_size": 4, "strategy": "vmap"}, {"hidden": 40})
    algo = build(host, task, plan, seed=0)
    score = meta_train(algo, task, meta_steps=3, eval_every=3,
                       generator=torch.Generator().manual_seed(0))
    assert math.isfinite(score)
    save_state(algo, tmp_path / "trial.pt")
    restored = build(host, task, plan, seed=1)  # another initialisation
    load_state(restored, tmp_path / "trial.pt")
    episodes = task.meta_val()
    assert torch.equal(restored.adapt_and_predict(episodes), algo.adapt_and_predict(episodes))
