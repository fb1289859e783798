"""Non-finite numbers never give a silent score: trial.evaluate raises Diverged.

Real algorithms on real tasks, their weights set to NaN (or made to overflow): argmax of
NaN logits is class 0, which used to score chance accuracy and be ranked like any trial.
"""

from __future__ import annotations

import math

import pytest
import torch

from autometa import Backbone, create_host
from autometa.study.trials import TrialPlan
from autometa.task import Task
from autometa.trial import Diverged, build, evaluate, meta_train
from autometa_plugins.digits.task import Digits, DigitsVsRest
from autometa_plugins.sinusoid.task import Sinusoid


def _algorithm(task: Task, name: str, params: dict | None = None):
    plan = TrialPlan(name, "mlp", params or {}, {"hidden": 8})
    return build(create_host(), task, plan, seed=0)


def _poison(model: Backbone, value: float, *, head_only: bool = True) -> None:
    with torch.no_grad():
        for p in (model.head if head_only else model).parameters():
            p.fill_(value)


@pytest.fixture(scope="module")
def digits() -> Digits:
    return Digits(ways=3, shots=1, queries=2, val_episodes=4, test_episodes=5)


@pytest.fixture(scope="module")
def sinusoid() -> Sinusoid:
    return Sinusoid(shots=5, queries=5, eval_queries=5, val_episodes=3, test_episodes=4)


def test_the_check_is_needed_nan_logits_score_like_a_model(digits):
    """Without the check: NaN logits give a finite accuracy (argmax is class 0)."""
    algo = _algorithm(digits, "maml")
    _poison(algo.model, math.nan)
    with torch.no_grad():
        pred = algo.adapt_and_predict(digits.meta_val())
    assert pred.isnan().all()
    assert torch.isfinite(digits.metric(pred, digits.meta_val().query_y)).all()


@pytest.mark.parametrize("name", ["maml", "finetune"])
def test_nan_weights_on_classification_raise_diverged_naming_the_split(digits, name):
    algo = _algorithm(digits, name, {"finetune_steps": 3} if name == "finetune" else {})
    _poison(algo.model, math.nan, head_only=False)
    with pytest.raises(Diverged, match=r"^meta-val predictions are not finite \(NaN\) in 4 "
                                       r"episodes, the first being episode 0"):
        evaluate(algo, digits.meta_val(), digits)
    # The leaderboard's call names no split: it is found among the task's.
    with pytest.raises(Diverged, match=r"^meta-test predictions"):
        evaluate(algo, digits.meta_test(), digits)
    assert algo.model.training  # the model is put back in training mode


def test_nan_weights_on_regression_fail_meta_training_as_diverged(sinusoid):
    algo = _algorithm(sinusoid, "maml")
    _poison(algo.model, math.nan)
    with pytest.raises(Diverged, match="meta-training loss is nan at step 1"):
        meta_train(algo, sinusoid, meta_steps=2, eval_every=1,
                   generator=torch.Generator().manual_seed(0))
    with pytest.raises(Diverged, match=r"^meta-test predictions are not finite \(NaN\)"):
        evaluate(algo, sinusoid.meta_test(), sinusoid)


def test_an_overflowing_score_is_caught_even_with_finite_predictions(sinusoid):
    """float32 predictions of 1e30 are finite; their squared error is not."""
    algo = _algorithm(sinusoid, "maml", {"inner_lr": 1e-30})
    _poison(algo.model, 0.0)
    with torch.no_grad():
        algo.model.head.bias.fill_(1e30)
    with pytest.raises(Diverged, match=r"^meta-val mse scores are not finite \(inf\) in 3 "
                                       r"episodes"):
        evaluate(algo, sinusoid.meta_val(), sinusoid, split="meta-val")


def test_a_single_episode_split_names_its_examples():
    """A target dataset's split is one episode scored per example."""
    task = DigitsVsRest(shots=2, queries=2)
    algo = _algorithm(task, "maml")
    with torch.no_grad():
        algo.model.head.bias.fill_(math.inf)  # inf - inf = NaN in the inner step's gradient
    with pytest.raises(Diverged, match=r"^meta-val predictions are not finite .* in 1 "
                                       r"episodes, the first being episode 0"):
        evaluate(algo, task.meta_val(), task)


def test_finite_weights_still_score(digits):
    score = evaluate(_algorithm(digits, "maml"), digits.meta_val(), digits)
    assert score.shape == (4,) and torch.isfinite(score).all()
