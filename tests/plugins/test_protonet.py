"""Prototypical Networks: logits and meta-gradient against naive float64 references,
per-episode BatchNorm batches, strategies, learning, the conformance kit, a trial."""

from __future__ import annotations

import copy
from functools import partial

import algorithm_helpers as helpers
import pytest
import torch
from torch import Tensor, nn

import autometa_plugins.protonet
from autometa import Backbone, Episodes
from autometa.testing import check_meta_algorithm
from autometa.trial import evaluate
from autometa_plugins.conv4.model import Conv4
from autometa_plugins.digits.task import Digits
from autometa_plugins.glyphs.task import Glyphs
from autometa_plugins.mlp.model import MLP
from autometa_plugins.protonet.algorithm import COSINE_SCALE, ProtoNet

IN, HIDDEN, WAYS = 3, 8, 4  # a small network and 4-way episodes


_Stub = partial(helpers.StubTask, kind="classification", input_shape=(IN,), output_size=WAYS)


def _mlp() -> Backbone:
    return helpers.small_network(IN, HIDDEN, WAYS, seed=0)


def _conv_bn() -> Backbone:
    """Convolution -> BatchNorm on batch statistics (like conv4): per-batch features."""
    torch.manual_seed(0)
    features = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3, track_running_stats=False),
                             nn.ReLU(), nn.Flatten())
    return Backbone(features, nn.Linear(3 * 3 * 3, WAYS)).double()


def _episodes(input_shape: tuple[int, ...] = (IN,), tasks: int = 3, n_q: int = 6) -> Episodes:
    """Support sets with unequal shots per class (3, 1, 2, 1), shuffled per task."""
    g = torch.Generator().manual_seed(1)
    labels = torch.tensor([0, 0, 0, 1, 2, 2, 3])
    support_y = torch.stack([labels[torch.randperm(len(labels), generator=g)]
                             for _ in range(tasks)])  # (tasks, 7)
    return helpers.labelled_episodes(support_y, n_q, input_shape, WAYS, g)


# --- the reference: one episode at a time, one class at a time, explicit distances ---

def _reference_logits(features: nn.Module, ep: Episodes, i: int, distance: str) -> Tensor:
    support = features(ep.support_x[i])  # the support set as one batch
    query = features(ep.query_x[i])  # the query set as another
    rows = []
    for q in query:
        row = []
        for c in range(WAYS):
            prototype = support[ep.support_y[i] == c].mean(0)
            if distance == "euclidean":
                row.append(-((q - prototype) ** 2).sum())
            else:
                row.append(COSINE_SCALE * (q @ prototype) / (q.norm() * prototype.norm()))
        rows.append(torch.stack(row))
    return torch.stack(rows)  # (n_query, ways)


def _reference_loss(features: nn.Module, ep: Episodes, distance: str) -> Tensor:
    losses = [nn.functional.cross_entropy(_reference_logits(features, ep, i, distance),
                                          ep.query_y[i]) for i in range(len(ep))]
    return torch.stack(losses).mean()


@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
@pytest.mark.parametrize("network", [_mlp, _conv_bn])
def test_logits_are_distances_to_class_means(network, distance):
    model = network()
    shape = (IN,) if network is _mlp else (1, 5, 5)
    algo = ProtoNet(model, _Stub(input_shape=shape), distance=distance)
    episodes = _episodes(shape)
    state = copy.deepcopy(model.state_dict())

    logits = algo.adapt_and_predict(episodes)

    assert logits.shape == (3, 6, WAYS) and not logits.requires_grad
    with torch.no_grad():
        for i in range(len(episodes)):
            expected = _reference_logits(model.features, episodes, i, distance)
            torch.testing.assert_close(logits[i], expected, rtol=0, atol=1e-10)
    torch.testing.assert_close(model.state_dict(), state, rtol=0, atol=0)


@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
@pytest.mark.parametrize("network", [_mlp, _conv_bn])
def test_meta_gradient_matches_autograd_one_episode_at_a_time(network, distance):
    model = network()
    shape = (IN,) if network is _mlp else (1, 5, 5)
    reference = copy.deepcopy(model)
    algo = ProtoNet(model, _Stub(input_shape=shape), distance=distance, lr=1e-3)
    episodes = _episodes(shape)
    expected_loss = _reference_loss(reference.features, episodes, distance)
    expected = torch.autograd.grad(expected_loss, list(reference.features.parameters()))

    loss = algo.meta_step(episodes)

    assert loss == pytest.approx(expected_loss.item(), rel=1e-12)
    for p, g in zip(model.features.parameters(), expected, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-6, atol=1e-12)
    # The head takes no part: no gradient, unchanged.
    assert all(p.grad is None for p in model.head.parameters())
    torch.testing.assert_close(model.head.state_dict(), reference.head.state_dict(),
                               rtol=0, atol=0)


@pytest.mark.parametrize("network", [_mlp, _conv_bn])
def test_vmap_and_loop_agree(network):
    shape = (IN,) if network is _mlp else (1, 5, 5)
    models = [network(), network()]
    algos = [ProtoNet(m, _Stub(input_shape=shape), strategy=s)
             for m, s in zip(models, ("vmap", "loop"), strict=True)]
    episodes = _episodes(shape, tasks=4)
    preds = [a.adapt_and_predict(episodes) for a in algos]
    torch.testing.assert_close(preds[0], preds[1], rtol=1e-12, atol=1e-12)
    losses = [a.meta_step(episodes) for a in algos]
    assert losses[0] == pytest.approx(losses[1], rel=1e-12)
    for a, b in zip(*(m.features.parameters() for m in models), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-12)


def test_each_episode_is_embedded_on_its_own():
    """With BatchNorm on batch statistics, an episode's logits do not depend on the others."""
    algo = ProtoNet(_conv_bn(), _Stub(input_shape=(1, 5, 5)))
    episodes = _episodes((1, 5, 5), tasks=3)
    together = algo.adapt_and_predict(episodes)
    alone = torch.cat([algo.adapt_and_predict(episodes[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(together, alone, rtol=1e-12, atol=1e-12)


def test_a_class_absent_from_the_support_set_is_never_predicted():
    algo = ProtoNet(_mlp(), _Stub())
    ep = _episodes()
    support_y = ep.support_y.clone()
    support_y[0][support_y[0] == 3] = 0  # episode 0 has no example of class 3
    logits = algo.adapt_and_predict(Episodes(ep.support_x, support_y, ep.query_x, ep.query_y))
    assert not logits.isnan().any()
    assert (logits[0].argmax(-1) != 3).all()
    assert (logits[0, :, 3] < logits[0, :, :3].min()).all()
    assert (logits[1:].argmax(-1) == 3).any()  # the others still predict class 3 somewhere


def test_regression_is_refused():
    assert "classification" in ProtoNet.incompatibility(_Stub(kind="regression"))
    assert ProtoNet.incompatibility(_Stub(kind="classification")) is None


@pytest.fixture(scope="module")
def digits() -> Digits:
    return Digits(ways=5, shots=1, queries=15, val_episodes=4, test_episodes=200)


@pytest.mark.parametrize("source, params", [(MLP, {}), (Conv4, {"channels": 8})])
def test_conformance(digits, source, params):
    check_meta_algorithm(ProtoNet, digits, source, params, meta_batch_size=2)


@pytest.fixture(scope="module")
def glyphs() -> Glyphs:
    """200 meta-train classes (~0.5 s to generate): enough for the embedding to transfer."""
    return Glyphs(ways=5, shots=1, queries=15, val_episodes=4, test_episodes=100,
                  train_classes=200, val_classes=5, test_classes=50)


@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
def test_learns_glyphs_5way_1shot(glyphs, distance):
    """Meta-training beats the untrained embedding on held-out classes.

    Digits would not show it: with its 5 meta-train classes the MLP's embedding overfits
    them and meta-test accuracy falls (0.61 untrained, 0.47 after 400 steps).
    """
    torch.manual_seed(0)
    algo = ProtoNet(MLP().build(glyphs.spec), glyphs, meta_batch_size=4, distance=distance)
    untrained = float(evaluate(algo, glyphs.meta_test(), glyphs).mean())
    helpers.meta_train_steps(algo, glyphs, 100)
    trained = float(evaluate(algo, glyphs.meta_test(), glyphs).mean())
    assert trained > 0.6 and trained > untrained + 0.25, (untrained, trained)


def test_runs_as_a_plugin_in_a_trial(digits, tmp_path):
    score = helpers.assert_runs_in_a_trial(tmp_path, "protonet", autometa_plugins.protonet,
                                           ProtoNet, digits,
                                           {"meta_batch_size": 4, "distance": "cosine"})
    assert 0 <= score <= 1
