"""autometa.gradient: the base of MAML, ANIL and Meta-SGD, and a one-line BOIL on it."""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor
from torch.func import functional_call

from autometa import Backbone, Episodes, MetaAlgorithm, Task
from autometa.gradient import GradientMetaLearner, body_only, head_only
from autometa.inner_loop import Strategy, adapt, adapt_episodes, meta_backward, parameters_of
from autometa.testing import check_meta_algorithm
from autometa_plugins.anil.algorithm import ANIL
from autometa_plugins.digits.task import Digits
from autometa_plugins.maml.algorithm import MAML
from autometa_plugins.metasgd.algorithm import MetaSGD
from autometa_plugins.mlp.model import MLP
from autometa_plugins.sinusoid.task import Sinusoid

SINUSOID = {"val_episodes": 4, "test_episodes": 4, "eval_queries": 5}


class BOIL(GradientMetaLearner):
    adapt_only = staticmethod(body_only)


@pytest.fixture(scope="module")
def sinusoid() -> Task:
    return Sinusoid(**SINUSOID)


def _model(task: Task, seed: int = 0) -> Backbone:
    torch.manual_seed(seed)
    return MLP(hidden=16).build(task.spec)


# --- (a) BOIL: the inner loop adapts the body only -------------------------------------------

def test_predicates_split_a_backbone() -> None:
    model = MLP(hidden=4).build(Sinusoid(**SINUSOID).spec)
    names = [n for n, _ in model.named_parameters()]
    assert [n for n in names if head_only(n)] == ["head.weight", "head.bias"]
    assert [n for n in names if body_only(n)] == [n for n in names if not n.startswith("head.")]
    assert all(head_only(n) != body_only(n) for n in names)


def test_boil_passes_body_only_to_the_inner_loop(sinusoid: Task) -> None:
    options = BOIL(_model(sinusoid), sinusoid).inner_loop_options()
    assert options["adapt_only"]("head.weight") is False
    assert options["adapt_only"]("features.0.weight") is True
    assert MAML(_model(sinusoid), sinusoid).inner_loop_options()["adapt_only"] is None


def test_boil_adapts_the_body_and_leaves_the_head(sinusoid: Task) -> None:
    algo = BOIL(_model(sinusoid), sinusoid, inner_lr=0.1, inner_steps=2)
    ep = sinusoid.meta_val()[:1]
    options = {k: v for k, v in algo.inner_loop_options(first_order=True).items()
               if k != "strategy"}
    params = {n: p.detach() for n, p in parameters_of(algo.model).items()}
    fast = adapt(algo.model, params, ep.support_x[0], ep.support_y[0], sinusoid.loss,
                 **options)
    for name, p in params.items():
        if head_only(name):
            assert torch.equal(fast[name], p), name
        else:
            assert not torch.equal(fast[name], p), name


def _body_sgd_prediction(model: Backbone, ep: Episodes, loss: Callable[..., Tensor],
                         lr: float) -> Tensor:
    """Hand-written reference: one SGD step on the body's parameters, per episode."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    preds = []
    for sx, sy, qx in zip(ep.support_x, ep.support_y, ep.query_x, strict=True):
        body = {n: p.clone().requires_grad_() for n, p in params.items() if body_only(n)}
        grads = torch.autograd.grad(loss(functional_call(model, {**params, **body}, (sx,)), sy),
                                    list(body.values()))
        fast = {n: p - lr * g for (n, p), g in zip(body.items(), grads, strict=True)}
        preds.append(functional_call(model, {**params, **fast}, (qx,)).detach())
    return torch.stack(preds)


@pytest.mark.parametrize("strategy", ["vmap", "loop"])
def test_boil_predictions_are_sgd_on_the_body(sinusoid: Task, strategy: Strategy) -> None:
    ep = sinusoid.meta_val()[:3]
    model = _model(sinusoid)
    boil = BOIL(model, sinusoid, inner_lr=0.5, strategy=strategy).adapt_and_predict(ep)
    torch.testing.assert_close(boil, _body_sgd_prediction(model, ep, sinusoid.loss, 0.5),
                               rtol=1e-5, atol=1e-6)
    # A zero step is the unadapted model; MAML (body and head adapted) predicts otherwise.
    still = BOIL(model, sinusoid, inner_lr=0.0, strategy=strategy).adapt_and_predict(ep)
    torch.testing.assert_close(still, torch.stack([model(x) for x in ep.query_x]).detach())
    maml = MAML(model, sinusoid, inner_lr=0.5, strategy=strategy).adapt_and_predict(ep)
    assert not torch.allclose(boil, maml)


def test_boil_conforms(sinusoid: Task) -> None:
    check_meta_algorithm(BOIL, sinusoid, MLP, {"hidden": 8}, meta_batch_size=2)
    digits = Digits(ways=3, shots=1, queries=2, val_episodes=4, test_episodes=4)
    check_meta_algorithm(BOIL, digits, MLP, {"hidden": 8}, meta_batch_size=2)


# --- the constructor the engine reads ---------------------------------------------------------

def test_hyperparameters_are_read_from_the_signatures() -> None:
    lora = {"adapter": "none", "lora_rank": 8, "lora_alpha": 16.0, "lora_targets": "attention"}
    keywords = {"inner_lr": 0.01, "inner_steps": 1, "meta_lr": 1e-3, "meta_batch_size": 25,
                "first_order": False, "strategy": "auto", **lora}
    for cls in (MAML, ANIL, BOIL):
        params = inspect.signature(cls).parameters
        assert {k: params[k].default for k in keywords} == keywords, cls
        assert cls.defaults() == keywords, cls
    assert "__init__" not in vars(MAML) and "__init__" not in vars(ANIL)
    # Meta-SGD keeps its own names (stored studies use init_inner_lr) and defaults.
    assert MetaSGD.defaults() == {"init_inner_lr": 0.01, "inner_steps": 1, "meta_lr": 1e-3,
                                  "meta_batch_size": 4, "first_order": False,
                                  "strategy": "auto", **lora}


def test_learned_rates_follow_each_parameter(sinusoid: Task) -> None:
    model = _model(sinusoid).to(torch.float64)
    algo = MetaSGD(model, sinusoid, init_inner_lr=0.03)
    assert isinstance(algo.inner_lr, dict)
    assert algo.inner_lr.keys() == dict(model.named_parameters()).keys()
    for name, p in model.named_parameters():
        rate = algo.inner_lr[name]
        assert rate.shape == p.shape and rate.dtype == torch.float64 and rate.requires_grad
        assert torch.all(rate == 0.03)
    assert set(algo.state_dict()) == {"model", "inner_lr"}
    assert set(MAML(model, sinusoid).state_dict()) == {"model"}


# --- (b) the same numbers as before the move into the host -----------------------------------
# The pre-refactor plugins, verbatim but for their search spaces (no numerics there): MAML
# held the machinery, ANIL and Meta-SGD subclassed it.

class _OldMAML(MetaAlgorithm):
    inner_params: Callable[[str], bool] | None = None

    def __init__(self, model: Backbone, task: Task, *, inner_lr: float = 0.01,
                 inner_steps: int = 1, meta_lr: float = 1e-3, meta_batch_size: int = 25,
                 first_order: bool = False, strategy: Strategy = "auto") -> None:
        super().__init__(model, task)
        self.inner_lr = inner_lr
        self.inner_steps = inner_steps
        self.first_order = first_order
        self.strategy: Strategy = strategy
        self.tasks_per_step = meta_batch_size
        self.optimizer = torch.optim.Adam(model.parameters(), lr=meta_lr)

    def _inner(self, first_order: bool) -> dict[str, Any]:
        return {"steps": self.inner_steps, "lr": self.inner_lr, "first_order": first_order,
                "adapt_only": self.inner_params, "strategy": self.strategy}

    def meta_step(self, batch: Episodes) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        loss = meta_backward(self.model, batch, self.task.loss, **self._inner(self.first_order))
        self.optimizer.step()
        return loss

    def adapt_and_predict(self, episodes: Episodes) -> Tensor:
        with torch.no_grad():
            return adapt_episodes(self.model, episodes, self.task.loss,
                                  **self._inner(first_order=True))


def _in_head(name: str) -> bool:
    return name.startswith("head.")


class _OldANIL(_OldMAML):
    inner_params = staticmethod(_in_head)


class _OldMetaSGD(_OldMAML):
    def __init__(self, model: Backbone, task: Task, *, init_inner_lr: float = 0.01,
                 inner_steps: int = 1, meta_lr: float = 1e-3, meta_batch_size: int = 4,
                 first_order: bool = False, strategy: Strategy = "auto") -> None:
        super().__init__(model, task, inner_steps=inner_steps, meta_lr=meta_lr,
                         meta_batch_size=meta_batch_size, first_order=first_order,
                         strategy=strategy)
        self.inner_lr: dict[str, Tensor] = {
            name: torch.full_like(p, init_inner_lr, requires_grad=True)
            for name, p in model.named_parameters()
        }
        self.optimizer = torch.optim.Adam(
            [*model.parameters(), *self.inner_lr.values()], lr=meta_lr
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "inner_lr": {name: lr.detach().clone() for name, lr in self.inner_lr.items()},
        }


@pytest.mark.parametrize(("new", "old", "hyperparameters"), [
    (MAML, _OldMAML, {"inner_lr": 0.05, "inner_steps": 2}),
    (ANIL, _OldANIL, {"inner_lr": 0.05, "inner_steps": 2}),
    (MetaSGD, _OldMetaSGD, {"init_inner_lr": 0.05}),
], ids=["maml", "anil", "metasgd"])
@pytest.mark.parametrize(("strategy", "first_order"), [
    ("vmap", False), ("loop", False), ("auto", True),
])
def test_meta_steps_are_bit_identical_to_the_pre_refactor_code(
    sinusoid: Task, new: type[MetaAlgorithm], old: type[MetaAlgorithm],
    hyperparameters: dict[str, Any], strategy: Strategy, first_order: bool,
) -> None:
    settings = {**hyperparameters, "meta_lr": 0.01, "meta_batch_size": 4,
                "first_order": first_order, "strategy": strategy}
    model = _model(sinusoid)
    algos = [cls(copy.deepcopy(model), sinusoid, **settings) for cls in (new, old)]
    for step in range(3):
        batch = sinusoid.sample(4, torch.Generator().manual_seed(step))
        losses = [a.meta_step(batch) for a in algos]
        assert losses[0] == losses[1], step
    states = [a.state_dict() for a in algos]
    assert states[0].keys() == states[1].keys()
    torch.testing.assert_close(states[0], states[1], rtol=0, atol=0)
    episodes = sinusoid.meta_val()
    torch.testing.assert_close(*(a.adapt_and_predict(episodes) for a in algos), rtol=0, atol=0)


def test_learned_rates_exist_for_the_adapted_parameters_only() -> None:
    """A head-only Meta-SGD learns the head's step sizes; the body gets none to carry."""
    from autometa_plugins.mlp.model import MLP
    from autometa_plugins.sinusoid.task import Sinusoid

    class HeadMetaSGD(GradientMetaLearner):
        adapt_only = staticmethod(head_only)
        learn_inner_lr = True

    task = Sinusoid(val_episodes=4, test_episodes=4, eval_queries=5)
    torch.manual_seed(0)
    algo = HeadMetaSGD(MLP(hidden=8).build(task.spec), task, meta_batch_size=2)
    assert sorted(algo.state_dict()["inner_lr"]) == ["head.bias", "head.weight"]
    before = {n: r.clone() for n, r in algo.state_dict()["inner_lr"].items()}
    algo.meta_step(task.sample(2, torch.Generator().manual_seed(0)))
    after = algo.state_dict()["inner_lr"]
    assert any(not torch.equal(before[n], after[n]) for n in before), "no rate was learned"
