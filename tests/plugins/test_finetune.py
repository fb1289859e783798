"""FineTune (Chen et al. 2019 Baseline and Baseline++): fine-tuning against per-episode
torch.optim references, the cosine classifier by hand, the training stage's global labels,
determinism, learning, conformance and a trial with a state round trip."""

from __future__ import annotations

import copy
import math
from functools import partial

import algorithm_helpers as helpers
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import autometa_plugins.finetune
from autometa import ConfigError, Episodes
from autometa.inner_loop import adapt_episodes
from autometa.testing import check_meta_algorithm
from autometa.trial import evaluate
from autometa_plugins.conv4.model import Conv4
from autometa_plugins.digits.task import Digits
from autometa_plugins.finetune.algorithm import HEAD_SEED, FineTune
from autometa_plugins.finetune.heads import Classifier, cosine_scale, logits
from autometa_plugins.mlp.model import MLP
from autometa_plugins.sinusoid.task import Sinusoid

IN, HIDDEN, WAYS, TRAIN_CLASSES = 3, 8, 4, 7
WD = 1e-3  # the paper's fine-tuning weight decay, FineTune's default


class _Stub(helpers.StubTask):
    """Shapes only; episodes come from the tests. Classification has a labelled pool of
    TRAIN_CLASSES classes (more than the WAYS of an episode) unless ``train_classes=0``."""

    def __init__(self, kind: str, train_classes: int = TRAIN_CLASSES) -> None:
        super().__init__(kind, (IN,), WAYS)
        self.train_classes = train_classes if kind == "classification" else 0
        self.drawn: list[tuple[Tensor, Tensor]] = []

    def sample_labelled(self, n, generator):
        x = torch.randn(n, IN, generator=generator, device=self.device, dtype=torch.float64)
        y = torch.randint(self.train_classes, (n,), generator=generator, device=self.device)
        self.drawn.append((x, y))
        return x, y


_network = partial(helpers.small_network, IN, HIDDEN, WAYS, seed=0)
_episodes = partial(helpers.random_episodes, in_size=IN, out=WAYS, n_s=6, n_q=5)


# --- references: one episode at a time, plain modules, torch.optim's own weight decay ---

class _CosineByHand(nn.Module):
    """scale * cos(f, w_c), written out."""

    def __init__(self, weight: Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.clone())

    def forward(self, f: Tensor) -> Tensor:
        dots = f @ self.weight.T  # (n, ways)
        norms = f.norm(dim=1, keepdim=True) * self.weight.norm(dim=1)  # (n, ways)
        return cosine_scale(len(self.weight)) * dots / norms


def _new_head(head: str) -> nn.Module:
    """A fresh copy of the classifier every episode starts from."""
    init = Classifier(head, WAYS, HIDDEN, generator=torch.Generator().manual_seed(HEAD_SEED),
                      dtype=torch.float64)
    if head == "cosine":
        return _CosineByHand(init.weight.detach())
    linear = nn.Linear(HIDDEN, WAYS).double()
    linear.load_state_dict(init.state_dict())
    return linear


def _fit_one(net: nn.Module, x: Tensor, y: Tensor, loss_fn, optimizer: str, steps: int,
             lr: float) -> None:
    params = list(net.parameters())
    if optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=lr, momentum=0.9, dampening=0.9, weight_decay=WD)
    elif optimizer == "adam":
        opt = torch.optim.Adam(params, lr=lr, weight_decay=WD)
    else:
        opt = torch.optim.LBFGS(params, lr=1, max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = loss_fn(net(x), y)
        if optimizer == "lbfgs":  # no weight_decay option: the L2 penalty it stands for
            loss = loss + WD / 2 * sum((p**2).sum() for p in params)
        loss.backward()
        return loss

    for _ in range(1 if optimizer == "lbfgs" else steps):
        opt.step(closure)


def _reference(algo: FineTune, episodes: Episodes, kind: str, head: str, finetune: str,
               optimizer: str, steps: int, lr: float) -> Tensor:
    loss_fn = F.cross_entropy if kind == "classification" else F.mse_loss
    preds = []
    for sx, sy, qx in zip(episodes.support_x, episodes.support_y, episodes.query_x,
                          strict=True):
        features = copy.deepcopy(algo.model.features)
        out = _new_head(head) if kind == "classification" else copy.deepcopy(algo.model.head)
        if finetune == "head":
            with torch.no_grad():
                sx, qx = features(sx), features(qx)
            net = out
        else:
            net = nn.Sequential(features, out)
        _fit_one(net, sx, sy, loss_fn, optimizer, steps, lr)
        preds.append(net(qx).detach())
    return torch.stack(preds)


@pytest.mark.parametrize(("kind", "head", "finetune", "optimizer"), [
    ("classification", "linear", "head", "sgd"),
    ("classification", "linear", "head", "adam"),
    ("classification", "cosine", "head", "sgd"),
    ("classification", "cosine", "head", "adam"),
    ("classification", "linear", "head", "lbfgs"),
    ("classification", "cosine", "head", "lbfgs"),
    ("classification", "cosine", "all", "sgd"),
    ("classification", "linear", "all", "adam"),
    ("regression", "linear", "head", "sgd"),
    ("regression", "linear", "all", "adam"),
    ("regression", "linear", "all", "lbfgs"),
])
def test_fine_tuning_equals_a_per_episode_torch_optim_reference(kind, head, finetune, optimizer):
    """Stacked SGD/Adam episodes (and looped L-BFGS) follow each episode's own run."""
    steps, lr = 15, 0.3
    algo = FineTune(_network(), _Stub(kind), head=head, finetune=finetune,
                    optimizer=optimizer, finetune_steps=steps, finetune_lr=lr)
    state = copy.deepcopy(algo.state_dict())
    episodes = _episodes(kind)
    pred = algo.adapt_and_predict(episodes)
    assert pred.shape == (3, 5, WAYS) and not pred.requires_grad
    torch.testing.assert_close(algo.state_dict(), state, rtol=0, atol=0)
    expected = _reference(algo, episodes, kind, head, finetune, optimizer, steps, lr)
    torch.testing.assert_close(pred, expected, rtol=1e-10, atol=1e-10)
    # The fine-tuning did something: the query predictions moved from the start's.
    start = _reference(algo, episodes, kind, head, finetune, "sgd", 0, lr)
    assert (pred - start).abs().max() > 1e-3


def test_plain_sgd_on_everything_is_the_inner_loop_toolkits_sgd():
    """momentum=0, weight_decay=0, finetune="all": plain SGD, as inner_loop.adapt_episodes
    runs it (what the plugin did for regression before it classified)."""
    algo = FineTune(_network(), _Stub("regression"), finetune="all", finetune_steps=10,
                    finetune_lr=0.2, momentum=0, weight_decay=0)
    episodes = _episodes("regression")
    expected = adapt_episodes(algo.model, episodes, F.mse_loss, steps=10, lr=0.2,
                              first_order=True, strategy="loop")
    torch.testing.assert_close(algo.adapt_and_predict(episodes), expected.detach(),
                               rtol=1e-10, atol=1e-10)


def test_cosine_logits_are_scaled_cosines():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(2, 6, HIDDEN, generator=g, dtype=torch.float64)  # (tasks, n, d)
    for classes, scale in ((5, 2.0), (200, 2.0), (201, 10.0)):  # distLinear's rule
        w = torch.randn(2, classes, HIDDEN, generator=g, dtype=torch.float64)
        expected = torch.empty(2, 6, classes, dtype=torch.float64)
        for t in range(2):
            for i in range(6):
                for c in range(classes):
                    a, b = f[t, i], w[t, c]
                    expected[t, i, c] = scale * (a @ b) / math.sqrt((a @ a) * (b @ b))
        torch.testing.assert_close(logits("cosine", f, w, None), expected,
                                   rtol=1e-12, atol=1e-12)
    head = Classifier("cosine", 5, HIDDEN, dtype=torch.float64)
    assert head.bias is None
    by_hand = _CosineByHand(head.weight.detach())
    torch.testing.assert_close(head(f[0]), by_hand(f[0]), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("head", ["linear", "cosine"])
def test_training_stage_classifies_all_meta_train_classes_with_global_labels(head):
    task = _Stub("classification")
    algo = FineTune(_network(), task, head=head, batch_size=64)
    assert algo.train_head.weight.shape == (TRAIN_CLASSES, HIDDEN)  # not the episodes' WAYS
    before = copy.deepcopy(algo.train_head)
    features = copy.deepcopy(algo.model.features)
    episode_head = copy.deepcopy(algo.model.head.state_dict())

    loss = algo.meta_step(_episodes("classification"))  # episodes are not used

    (x, y), = task.drawn
    assert int(y.max()) >= WAYS  # global labels, beyond any episode's
    assert loss == pytest.approx(F.cross_entropy(before(features(x)), y).item(), rel=1e-12)
    # Adam's first step moves every element with a gradient by about lr: all classes' rows.
    moved = (algo.train_head.weight - before.weight).abs()  # (classes, dim)
    assert moved.shape[0] == TRAIN_CLASSES and (moved.amax(1) > 5e-4).all()
    assert any(not torch.equal(a, b) for a, b in zip(
        features.parameters(), algo.model.features.parameters(), strict=True))
    # The Backbone's own head (the episodes' ways) is not what the training stage trains.
    torch.testing.assert_close(algo.model.head.state_dict(), episode_head, rtol=0, atol=0)


def test_classification_needs_a_labelled_meta_train_pool():
    reason = FineTune.incompatibility(_Stub("classification", train_classes=0))
    assert reason is not None and "train_classes = 0" in reason
    assert "labelled meta-train pool" in reason
    assert FineTune.incompatibility(_Stub("classification")) is None
    assert FineTune.incompatibility(_Stub("regression")) is None
    with pytest.raises(ConfigError, match="labelled meta-train pool"):
        FineTune(_network(), _Stub("classification", train_classes=0))


@pytest.mark.parametrize(("name", "value"), [
    ("head", "euclidean"), ("optimizer", "rmsprop"), ("finetune", "body"),
    ("finetune_steps", 0), ("batch_size", 2.5), ("momentum", 1.0),
])
def test_rejects_bad_settings(name, value):
    with pytest.raises(ConfigError, match=f"finetune.{name}: "):
        FineTune(_network(), _Stub("classification"), **{name: value})


@pytest.mark.parametrize("head", ["linear", "cosine"])
def test_predictions_do_not_depend_on_the_global_generator_or_the_chunking(head):
    algo = FineTune(_network(), _Stub("classification"), head=head, finetune_steps=10)
    episodes = _episodes("classification", tasks=5)
    torch.manual_seed(1)
    pred = algo.adapt_and_predict(episodes)
    torch.manual_seed(2)
    assert torch.equal(algo.adapt_and_predict(episodes), pred)
    chunks = torch.cat([algo.adapt_and_predict(episodes[:2]), algo.adapt_and_predict(episodes[2:])])
    torch.testing.assert_close(chunks, pred, rtol=1e-12, atol=1e-12)


# --- learning ---

@pytest.fixture(scope="module")
def digits() -> Digits:
    return Digits(ways=5, shots=5, queries=15, val_episodes=4, test_episodes=200)


@pytest.mark.parametrize(("head", "margin"), [("linear", 0.2), ("cosine", 0.05)])
def test_learns_digits_5way_5shot(digits, head, margin):
    torch.manual_seed(0)
    algo = FineTune(MLP().build(digits.spec), digits, head=head)
    untrained = float(evaluate(algo, digits.meta_test(), digits).mean())
    helpers.meta_train_steps(algo, digits, 300)
    trained = float(evaluate(algo, digits.meta_test(), digits).mean())
    assert trained > untrained + margin, (untrained, trained)
    # The training stage fits the meta-train classes (fresh labelled examples).
    x, y = digits.sample_labelled(500, torch.Generator().manual_seed(1))
    with torch.no_grad():
        train_accuracy = float((algo.train_head(algo.model.features(x)).argmax(1) == y)
                               .double().mean())
    assert train_accuracy > 0.9, train_accuracy


def test_learns_sinusoid():
    task = Sinusoid(val_episodes=4, test_episodes=100, eval_queries=20)
    torch.manual_seed(0)
    algo = FineTune(MLP().build(task.spec), task, finetune="all")
    untrained = float(evaluate(algo, task.meta_test(), task).mean())
    helpers.meta_train_steps(algo, task, 300)
    trained = float(evaluate(algo, task.meta_test(), task).mean())
    assert trained < 0.7 * untrained, (untrained, trained)


# --- the engine's view ---

@pytest.mark.parametrize(("source", "source_params", "hyperparameters"), [
    (MLP, {}, {"head": "cosine", "optimizer": "adam"}),
    (Conv4, {"channels": 8}, {"optimizer": "lbfgs", "finetune_steps": 10}),
    (Conv4, {"channels": 8}, {"finetune": "all", "finetune_steps": 5}),
])
def test_conforms_on_classification(source, source_params, hyperparameters):
    task = Digits(ways=3, shots=1, queries=2, val_episodes=4, test_episodes=4)
    check_meta_algorithm(FineTune, task, source, source_params, **hyperparameters)


@pytest.mark.parametrize("hyperparameters", [
    {"batch_tasks": 2, "finetune": "all"}, {"batch_tasks": 2, "optimizer": "lbfgs"},
])
def test_conforms_on_regression(hyperparameters):
    task = Sinusoid(val_episodes=4, test_episodes=4, eval_queries=5)
    check_meta_algorithm(FineTune, task, MLP, {"hidden": 8}, **hyperparameters)


def test_search_space_declares_keyword_arguments_with_defaults_in_range():
    helpers.assert_search_space_defaults_in_range(FineTune, "finetune")


@pytest.mark.parametrize(("task", "params"), [
    (Digits(ways=5, shots=1, queries=3, val_episodes=4, test_episodes=4),
     {"head": "cosine", "optimizer": "adam", "finetune_steps": 10}),
    (Sinusoid(val_episodes=4, test_episodes=4, eval_queries=10),
     {"batch_tasks": 4, "finetune": "all", "finetune_steps": 10}),
])
def test_runs_as_a_plugin_in_a_trial(tmp_path, task, params):
    helpers.assert_runs_in_a_trial(tmp_path, "finetune", autometa_plugins.finetune, FineTune,
                                   task, params)
