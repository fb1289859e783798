"""ANIL: meta-gradients against a hand-written float64 reference, strategies, learning."""

from __future__ import annotations

import copy
import inspect
import math

import pytest
import torch
from torch import Tensor, nn

import autometa_plugins.anil
import autometa_plugins.mlp
from autometa import Backbone, Episodes, Task, create_host
from autometa.space import check_value
from autometa.trial import TrialPlan, build, evaluate, load_state, meta_train, save_state
from autometa_plugins.anil.algorithm import ANIL
from autometa_plugins.digits.task import Digits
from autometa_plugins.mlp.model import MLP
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
    # tanh rather than ReLU: its second derivative is not zero, so every second-order
    # term of the meta-gradient is exercised.
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
    g = torch.Generator().manual_seed(0)
    for _ in range(800):
        algo.meta_step(task.sample(algo.tasks_per_step, g))
    trained = float(evaluate(algo, task.meta_test(), task).mean())
    assert trained < 0.5 * untrained, (untrained, trained)


def test_learns_digits_5way_1shot():
    task = Digits(ways=5, shots=1, queries=15, val_episodes=4, test_episodes=200)
    torch.manual_seed(0)
    algo = ANIL(MLP().build(task.spec), task, inner_lr=0.4, inner_steps=5, meta_batch_size=10,
                strategy=VMAP)
    untrained = float(evaluate(algo, task.meta_test(), task).mean())
    g = torch.Generator().manual_seed(0)
    # Short on purpose: digits has only 5 meta-train classes, and longer meta-training
    # overfits them (the meta-train loss goes to 0 while held-out accuracy falls back).
    for _ in range(150):
        algo.meta_step(task.sample(algo.tasks_per_step, g))
    trained = float(evaluate(algo, task.meta_test(), task).mean())
    assert trained > 0.4 and trained > untrained + 0.1, (untrained, trained)


def test_search_space_declares_keyword_arguments_with_defaults_in_range():
    defaults = {name: p.default for name, p in inspect.signature(ANIL).parameters.items()
                if p.kind is inspect.Parameter.KEYWORD_ONLY}
    for name, param in ANIL.search_space().items():
        assert name in defaults, name
        check_value(f"anil.{name}", param, defaults[name])  # raises ConfigError if outside


def test_runs_as_a_plugin_in_a_trial(tmp_path):
    host = create_host(entry_points=False,
                       plugins={"anil": autometa_plugins.anil, "mlp": autometa_plugins.mlp})
    assert host.get("algorithm", "anil").load() is ANIL
    task = Sinusoid(val_episodes=4, test_episodes=4, eval_queries=10)
    plan = TrialPlan("anil", "mlp", {"meta_batch_size": 4, "strategy": "vmap"}, {"hidden": 40})
    algo = build(host, task, plan, seed=0)
    score = meta_train(algo, task, meta_steps=3, eval_every=3,
                       generator=torch.Generator().manual_seed(0))
    assert math.isfinite(score)
    save_state(algo, tmp_path / "trial.pt")
    restored = build(host, task, plan, seed=1)  # another initialisation
    load_state(restored, tmp_path / "trial.pt")
    episodes = task.meta_val()
    assert torch.equal(restored.adapt_and_predict(episodes), algo.adapt_and_predict(episodes))
