"""Meta-SGD: meta-gradients against a float64 reference, strategies, state, learning."""

from __future__ import annotations

import copy
import inspect
import math

import pytest
import torch
from torch import Tensor, nn

import autometa_plugins.metasgd
import autometa_plugins.mlp
from autometa import Backbone, Episodes, Task, create_host
from autometa.space import check_value
from autometa.trial import TrialPlan, build, evaluate, load_state, meta_train, save_state
from autometa_plugins.metasgd.algorithm import MetaSGD
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
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    trained = MetaSGD(MLP().build(task.spec), task, meta_lr=0.01)
    for _ in range(5):
        trained.meta_step(task.sample(trained.tasks_per_step, g))
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
    g = torch.Generator().manual_seed(0)
    for _ in range(600):
        algo.meta_step(task.sample(algo.tasks_per_step, g))
    trained = float(evaluate(algo, task.meta_test(), task).mean())
    # Zero-mean predictions would score ~4.2 (mean A^2 / 2); meta-learning gets well below.
    assert trained < 0.3 * untrained, (untrained, trained)


def test_search_space_declares_keyword_arguments_with_defaults_in_range():
    defaults = {name: p.default for name, p in inspect.signature(MetaSGD).parameters.items()
                if p.kind is inspect.Parameter.KEYWORD_ONLY}
    for name, param in MetaSGD.search_space().items():
        assert name in defaults, name
        check_value(f"metasgd.{name}", param, defaults[name])  # raises ConfigError if outside


def test_runs_as_a_plugin_in_a_trial(tmp_path):
    host = create_host(entry_points=False,
                       plugins={"metasgd": autometa_plugins.metasgd, "mlp": autometa_plugins.mlp})
    assert host.get("algorithm", "metasgd").load() is MetaSGD
    task = Sinusoid(val_episodes=4, test_episodes=4, eval_queries=10)
    plan = TrialPlan("metasgd", "mlp", {"meta_batch_size": 4, "strategy": "vmap"}, {"hidden": 40})
    algo = build(host, task, plan, seed=0)
    score = meta_train(algo, task, meta_steps=3, eval_every=3,
                       generator=torch.Generator().manual_seed(0))
    assert math.isfinite(score)
    save_state(algo, tmp_path / "trial.pt")
    restored = build(host, task, plan, seed=1)  # another initialisation
    load_state(restored, tmp_path / "trial.pt")
    episodes = task.meta_val()
    assert torch.equal(restored.adapt_and_predict(episodes), algo.adapt_and_predict(episodes))
