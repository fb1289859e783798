"""Linear probe: predictions against scikit-learn fitted by hand, absent classes, frozen
state, learning, the conformance kit, a trial without meta-training."""

from __future__ import annotations

import copy
import logging
import math
import warnings
from functools import partial

import algorithm_helpers as helpers
import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from torch import nn

import autometa_plugins.linear_probe
from autometa import Backbone, Episodes
from autometa.study.trials import TrialPlan
from autometa.testing import check_meta_algorithm
from autometa.trial import Diverged, build, evaluate, meta_train
from autometa_plugins.conv4.model import Conv4
from autometa_plugins.digits.task import Digits
from autometa_plugins.linear_probe.algorithm import LinearProbe
from autometa_plugins.mlp.model import MLP

IN, HIDDEN, WAYS = 3, 8, 4  # a small network and 4-way episodes


_Stub = partial(helpers.StubTask, kind="classification", input_shape=(IN,), output_size=WAYS)
_network = partial(helpers.small_network, IN, HIDDEN, WAYS, seed=0)


def _episodes(support_y: list[list[int]], n_q: int = 6) -> Episodes:
    return helpers.labelled_episodes(torch.tensor(support_y), n_q, (IN,), WAYS,
                                     torch.Generator().manual_seed(1))


def _by_hand(model: Backbone, ep: Episodes, i: int, normalize: bool, C: float
             ) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn on episode i's features: (classes seen, log-probabilities (n_q, classes))."""
    with torch.no_grad():
        s, q = model.features(ep.support_x[i]), model.features(ep.query_x[i])
    if normalize:
        s, q = s / s.norm(dim=-1, keepdim=True), q / q.norm(dim=-1, keepdim=True)
    clf = LogisticRegression(C=C, max_iter=1000).fit(s.numpy(), ep.support_y[i].numpy())
    return clf.classes_, clf.predict_log_proba(q.numpy())


ALL_CLASSES = [[0, 0, 1, 1, 1, 2, 3, 3], [3, 2, 1, 0, 0, 1, 2, 3]]


@pytest.mark.parametrize("normalize, C", [(True, 1.0), (False, 0.05), (True, 100.0)])
def test_predictions_are_scikit_learn_on_the_features(normalize, C):
    model = _network()
    algo = LinearProbe(model, _Stub(), C=C, normalize=normalize)
    episodes = _episodes(ALL_CLASSES)
    state = copy.deepcopy(model.state_dict())

    pred = algo.adapt_and_predict(episodes)

    assert pred.shape == (2, 6, WAYS) and pred.dtype == torch.float64
    for i in range(len(episodes)):
        classes, expected = _by_hand(model, episodes, i, normalize, C)
        assert list(classes) == list(range(WAYS))
        np.testing.assert_allclose(pred[i].numpy(), expected, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(model.state_dict(), state, rtol=0, atol=0)
    assert torch.equal(algo.adapt_and_predict(episodes), pred)  # deterministic


def test_classes_absent_from_the_support_set():
    """Absent classes: a finite, very low score, never predicted; the rest is scikit-learn's."""
    model = _network()
    algo = LinearProbe(model, _Stub())
    supports = [[0, 0, 1, 1, 3, 3], [2, 2, 0, 0, 2, 0], [1, 1, 1, 1, 1, 1]]  # 3, 2, 1 classes
    episodes = _episodes(supports)

    pred = algo.adapt_and_predict(episodes)

    assert torch.isfinite(pred).all()
    for i, support in enumerate(supports):
        present = sorted(set(support))
        absent = [c for c in range(WAYS) if c not in present]
        assert set(pred[i].argmax(-1).tolist()) <= set(present)
        assert (pred[i][:, absent] < pred[i][:, present].min() - 100).all()
        probabilities = pred[i][:, present].exp().sum(-1)
        torch.testing.assert_close(probabilities, torch.ones_like(probabilities))
        if len(present) > 1:
            classes, expected = _by_hand(model, episodes, i, True, 1.0)
            assert list(classes) == present
            np.testing.assert_allclose(pred[i][:, present].numpy(), expected, rtol=1e-6,
                                       atol=1e-8)
    assert (pred[2].argmax(-1) == 1).all()  # a single class seen: that class


def test_batchnorm_running_statistics_are_left_alone():
    """Frozen features: running statistics are used, never updated, even in training mode."""
    torch.manual_seed(0)
    features = nn.Sequential(nn.Linear(IN, HIDDEN), nn.BatchNorm1d(HIDDEN), nn.Tanh())
    model = Backbone(features, nn.Linear(HIDDEN, WAYS)).double()
    model.features[1].running_mean.uniform_()
    state = copy.deepcopy(model.state_dict())
    algo = LinearProbe(model, _Stub())
    episodes = _episodes(ALL_CLASSES)

    pred = algo.adapt_and_predict(episodes)

    assert model.training and model.features.training
    torch.testing.assert_close(model.state_dict(), state, rtol=0, atol=0)
    model.eval()
    torch.testing.assert_close(algo.adapt_and_predict(episodes), pred, rtol=0, atol=0)


def test_lbfgs_stopping_early_is_logged_once_not_warned_per_episode(caplog):
    algo = LinearProbe(_network(), _Stub(), C=1e3, max_iter=2)
    with warnings.catch_warnings(), caplog.at_level(logging.INFO):
        warnings.simplefilter("error")  # any warning that escapes fails the test
        pred = algo.adapt_and_predict(_episodes(ALL_CLASSES))
    assert torch.isfinite(pred).all()
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1 and "max_iter=2" in messages[0], messages
    assert "on 2 of 2 episodes" in messages[0], messages


def test_meta_step_says_the_probe_does_not_meta_train():
    algo = LinearProbe(_network(), _Stub())
    assert not algo.meta_trains
    with pytest.raises(NotImplementedError, match="meta_trains is False"):
        algo.meta_step(_episodes(ALL_CLASSES))


def test_regression_is_refused():
    assert "classification" in LinearProbe.incompatibility(_Stub(kind="regression"))
    assert LinearProbe.incompatibility(_Stub(kind="classification")) is None


@pytest.fixture(scope="module")
def digits() -> Digits:
    return Digits(ways=5, shots=5, queries=15, val_episodes=4, test_episodes=100)


@pytest.mark.parametrize("source, params", [(MLP, {}), (Conv4, {"channels": 8})])
def test_conformance(digits, source, params):
    check_meta_algorithm(LinearProbe, digits, source, params)


def test_learns_digits_5way_5shot_on_random_features(digits):
    """Even random MLP features separate digits; the un-adapted head is at chance."""
    torch.manual_seed(0)
    model = MLP().build(digits.spec)
    episodes = digits.meta_test()
    with torch.no_grad():
        logits = model(episodes.query_x.flatten(0, 1)).unflatten(0, episodes.query_y.shape)
    unadapted = float(digits.metric(logits, episodes.query_y).mean())
    probe = float(evaluate(LinearProbe(model, digits), episodes, digits).mean())
    assert probe > 0.7 and probe > unadapted + 0.3, (unadapted, probe)


def test_runs_in_a_trial_without_meta_training(digits, tmp_path):
    host = helpers.trial_host("linear-probe", autometa_plugins.linear_probe, LinearProbe)
    plan = TrialPlan("linear-probe", "mlp", {"C": 10.0}, {"hidden": 40})
    algo = build(host, digits, plan, seed=0)
    initial = copy.deepcopy(algo.model.state_dict())
    # meta_step would raise: the engine must skip it and only score meta-val.
    score = meta_train(algo, digits, meta_steps=5, eval_every=2,
                       generator=torch.Generator().manual_seed(0))
    assert math.isfinite(score) and score > 0.5
    torch.testing.assert_close(algo.model.state_dict(), initial, rtol=0, atol=0)
    helpers.assert_state_round_trip(host, digits, plan, algo, tmp_path)


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_features_fail_the_trial_as_diverged(digits, value):
    """scikit-learn refuses NaN/inf features with a ValueError that used to end the search;
    the probe names the episodes instead, and the engine records a diverged trial."""
    host = helpers.trial_host("linear-probe", autometa_plugins.linear_probe, LinearProbe)
    algo = build(host, digits, TrialPlan("linear-probe", "mlp", {}, {"hidden": 8}), seed=0)
    with torch.no_grad():
        algo.model.features[1].weight[0, 0] = value  # one weight of the first layer
    with pytest.raises(FloatingPointError, match=r"^LinearProbe: the source model's features "
                                                 r"are NaN or infinite in \d+ of 4 episodes"):
        algo.adapt_and_predict(digits.meta_val())
    with pytest.raises(Diverged, match=r"^meta-val: LinearProbe: the source model's features"):
        meta_train(algo, digits, meta_steps=5, eval_every=2,
                   generator=torch.Generator().manual_seed(0))
