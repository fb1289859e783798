"""P>M>F: prototypes and logits against naive references, lr 0 is ProtoNet, fine-tuning
against a plain per-episode loop, the lr choice, chunking, the state round trip, the
conformance kit, meta_train=False in a search, and a CLI search beside the baselines."""

from __future__ import annotations

import copy
import io
import logging
import subprocess
import sys
from pathlib import Path

import algorithm_helpers as helpers
import optuna
import pandas as pd
import pytest
import torch
from limits import CLI_SEARCH
from torch import Tensor, nn

import autometa
from autometa import Backbone, Episodes
from autometa.study.storage import open_storage
from autometa.testing import check_meta_algorithm
from autometa_plugins.conv4.model import Conv4
from autometa_plugins.digits.task import Digits
from autometa_plugins.mlp.model import MLP
from autometa_plugins.pmf.algorithm import PMF, class_prototypes, prototype_logits
from autometa_plugins.protonet.algorithm import ProtoNet

IN, HIDDEN, WAYS = 3, 8, 4


class EpisodeTask(helpers.StubTask):
    """A classification task whose meta-val episodes are given; counts meta_val() calls."""

    def __init__(self, val: Episodes, input_shape: tuple[int, ...] = (IN,),
                 ways: int = WAYS) -> None:
        super().__init__("classification", input_shape, ways)
        self.val, self.calls = val, 0

    def meta_val(self):
        self.calls += 1
        return self.val


def _mlp(seed: int = 0) -> Backbone:
    return helpers.small_network(IN, HIDDEN, WAYS, seed=seed)


def _conv_bn(seed: int = 0) -> Backbone:
    """Convolution -> BatchNorm on batch statistics (like conv4): per-batch features."""
    torch.manual_seed(seed)
    features = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3, track_running_stats=False),
                             nn.ReLU(), nn.Flatten())
    return Backbone(features, nn.Linear(27, WAYS)).double()


def _episodes(input_shape: tuple[int, ...] = (IN,), tasks: int = 3, n_q: int = 6,
              seed: int = 1) -> Episodes:
    """Support sets with unequal shots per class (3, 1, 2, 1), shuffled per task."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.tensor([0, 0, 0, 1, 2, 2, 3])
    support_y = torch.stack([labels[torch.randperm(len(labels), generator=g)]
                             for _ in range(tasks)])
    return helpers.labelled_episodes(support_y, n_q, input_shape, WAYS, g)


def _reference_logits(support: Tensor, support_y: Tensor, query: Tensor, distance: str,
                      scale: float = 10.0, bias: float = 0.0) -> Tensor:
    """One episode, one class at a time: (n_s, d), (n_s,), (n_q, d) -> (n_q, WAYS)."""
    rows = []
    for q in query:
        row = []
        for c in range(WAYS):
            p = support[support_y == c].mean(0)
            if distance == "euclidean":
                row.append(-((q - p) ** 2).sum())
            else:
                row.append(scale * ((q @ p) / (q.norm() * p.norm()) + bias))
        rows.append(torch.stack(row))
    return torch.stack(rows)


@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
def test_prototypes_and_logits_match_a_reference(distance):
    g = torch.Generator().manual_seed(0)
    support, query = (torch.randn(2, n, 5, generator=g, dtype=torch.float64) for n in (7, 4))
    support_y = torch.tensor([[0, 0, 0, 1, 2, 2, 3], [3, 2, 1, 0, 0, 1, 2]])
    prototypes, counts = class_prototypes(support, support_y, WAYS)
    scale, bias = torch.tensor(3.0, dtype=torch.float64), torch.tensor(0.25, dtype=torch.float64)
    logits = prototype_logits(query, prototypes, counts, distance, scale, bias)
    assert counts.tolist() == [[3, 1, 2, 1], [2, 2, 2, 1]]
    for t in range(2):
        expected = _reference_logits(support[t], support_y[t], query[t], distance, 3.0, 0.25)
        torch.testing.assert_close(logits[t], expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
@pytest.mark.parametrize("network", [_mlp, _conv_bn])
def test_lr_zero_is_protonet_on_frozen_features(network, distance):
    shape = (IN,) if network is _mlp else (1, 5, 5)
    episodes = _episodes(shape)
    pmf = PMF(network(), EpisodeTask(episodes, shape), distance=distance, finetune_lrs=[0])
    protonet = ProtoNet(network(), helpers.StubTask("classification", shape, WAYS),
                        distance=distance)
    torch.testing.assert_close(pmf.adapt_and_predict(episodes),
                               protonet.adapt_and_predict(episodes), rtol=0, atol=1e-12)
    assert pmf.finetune_lr == 0


def test_the_meta_step_is_protonets_with_a_learned_scale():
    episodes = _episodes()
    model, reference = _mlp(), _mlp()
    algo = PMF(model, EpisodeTask(episodes), meta_lr=1e-3)
    with torch.no_grad():
        algo.scale.fill_(2.0)
        algo.bias.fill_(0.5)
    losses = []
    for t in range(len(episodes)):
        f = reference.features
        logits = _reference_logits(f(episodes.support_x[t]), episodes.support_y[t],
                                   f(episodes.query_x[t]), "cosine", 2.0, 0.5)
        losses.append(nn.functional.cross_entropy(logits, episodes.query_y[t]))
    expected = torch.stack(losses).mean()
    grads = torch.autograd.grad(expected, list(reference.features.parameters()))
    assert algo.meta_step(episodes) == pytest.approx(expected.item(), rel=1e-12)
    for p, g in zip(model.features.parameters(), grads, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-8, atol=1e-12)
    assert algo.scale.grad is not None and algo.bias.grad is not None
    assert all(p.grad is None for p in model.head.parameters())


@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
@pytest.mark.parametrize("network", [_mlp, _conv_bn])
def test_finetuning_is_adam_on_the_support_sets_protonet_loss(network, distance):
    """Against a deep copy of the features fine-tuned with torch.optim.Adam, one episode
    at a time, the loss written out class by class."""
    shape = (IN,) if network is _mlp else (1, 5, 5)
    episodes, lr, steps = _episodes(shape), 1e-2, 5
    model = network()
    state = copy.deepcopy(model.state_dict())
    algo = PMF(model, EpisodeTask(episodes, shape), distance=distance, finetune_lrs=[lr],
               finetune_steps=steps)
    pred = algo.adapt_and_predict(episodes)
    for t in range(len(episodes)):
        f = copy.deepcopy(network().features)
        opt = torch.optim.Adam(f.parameters(), lr=lr)
        sx, sy = episodes.support_x[t], episodes.support_y[t]
        for _ in range(steps):
            opt.zero_grad()
            s = f(sx)
            nn.functional.cross_entropy(_reference_logits(s, sy, s, distance), sy).backward()
            opt.step()
        with torch.no_grad():
            expected = _reference_logits(f(sx), sy, f(episodes.query_x[t]), distance)
        torch.testing.assert_close(pred[t], expected, rtol=0, atol=1e-9)
    torch.testing.assert_close(model.state_dict(), state, rtol=0, atol=0)  # untouched


def _clusters(tasks: int, shots: int, seed: int) -> Episodes:
    """4-way episodes: the class is in input 0 (means -3, -1, 1, 3, spread 0.3); inputs 1
    and 2 are noise of spread 3. Features that read only the noise are at chance."""
    g = torch.Generator().manual_seed(seed)

    def draw(n: int) -> tuple[Tensor, Tensor]:
        y = torch.arange(WAYS).repeat(tasks, n)  # (tasks, n * ways)
        x = torch.randn(tasks, n * WAYS, IN, generator=g, dtype=torch.float64) * 3
        x[..., 0] = (2 * y - 3) + 0.3 * torch.randn(y.shape, generator=g, dtype=torch.float64)
        return x, y

    (sx, sy), (qx, qy) = draw(shots), draw(5)
    return Episodes(sx, sy, qx, qy)


def _blind(read: int) -> Backbone:
    """Linear features that read input ``read`` only (a weak weight on the others)."""
    model = _mlp()
    with torch.no_grad():
        weight = model.features[0].weight
        weight.mul_(0.01)
        weight[:, read] = torch.linspace(-1, 1, HIDDEN, dtype=torch.float64)
    return model


@pytest.mark.parametrize("read, helps", [(1, True), (0, False)])
def test_the_lr_is_chosen_on_the_labelled_episodes(read, helps, caplog):
    """Features blind to the class (``read=1``): fine-tuning helps (chance -> 0.86) and a
    positive lr wins. Features that read it (``read=0``): fine-tuning on 5 shots hurts
    (0.96 -> 0.86), and lr 1e-9 ties with 0: the tie goes to 0."""
    val, test = _clusters(6, 5, seed=0), _clusters(3, 5, seed=1)
    lrs = [0.0, 1e-9, 1e-2, 1e-1]
    task = EpisodeTask(val)
    algo = PMF(_blind(read), task, finetune_lrs=lrs, finetune_steps=30, select_episodes=4)
    with caplog.at_level(logging.INFO, logger="autometa_plugins.pmf.algorithm"):
        pred = algo.adapt_and_predict(test)
    # Each candidate alone, on the same first four meta-val episodes.
    alone = {lr: float(PMF(_blind(read), task, finetune_lrs=[lr], finetune_steps=30)
                       .adapt_and_predict(val[:4]).argmax(-1).eq(val.query_y[:4])
                       .double().mean()) for lr in lrs}
    assert algo.selection == pytest.approx(alone, abs=1e-6)  # float32 accuracies
    best = max(alone.values())
    assert algo.finetune_lr == min(lr for lr in lrs if alone[lr] > best - 1e-6)
    if helps:
        assert algo.finetune_lr > 1e-9 and best > alone[0] + 0.2, alone
    else:
        assert alone[1e-9] == alone[0] > max(alone[1e-2], alone[1e-1]) + 0.05, alone
        assert algo.finetune_lr == 0
    torch.testing.assert_close(pred, PMF(_blind(read), task, finetune_lrs=[algo.finetune_lr],
                                         finetune_steps=30).adapt_and_predict(test))
    assert f"pmf: fine-tuning lr {algo.finetune_lr:g} chosen on 4 labelled" in caplog.text
    # Chosen once, then cached; a meta-step invalidates the choice.
    calls = task.calls
    algo.adapt_and_predict(test)
    assert task.calls == calls
    algo.meta_step(test)
    assert algo.finetune_lr is None and algo.selection == {}


def test_predictions_do_not_depend_on_chunks_or_the_global_generator():
    episodes = _episodes((1, 5, 5), tasks=4)
    algo = PMF(_conv_bn(), EpisodeTask(episodes, (1, 5, 5)), finetune_lrs=[0, 1e-2],
               finetune_steps=5, select_episodes=2)
    torch.manual_seed(1)
    together = algo.adapt_and_predict(episodes)
    torch.manual_seed(2)
    alone = torch.cat([algo.adapt_and_predict(episodes[i : i + 1]) for i in range(4)])
    assert torch.equal(together, alone)


def test_the_choice_survives_a_state_round_trip():
    val = _clusters(4, 5, seed=0)
    task = EpisodeTask(val)
    algo = PMF(_blind(1), task, finetune_lrs=[0, 1e-2, 1e-1], finetune_steps=10)
    pred = algo.adapt_and_predict(val)
    buffer = io.BytesIO()
    torch.save(algo.state_dict(), buffer)
    buffer.seek(0)
    restored = PMF(_mlp(seed=5), EpisodeTask(val), finetune_lrs=[0, 1e-2, 1e-1],
                   finetune_steps=10)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert restored.finetune_lr == algo.finetune_lr and restored.selection == algo.selection
    assert torch.equal(restored.adapt_and_predict(val), pred)
    assert restored.task.calls == 0  # restored, not chosen again


def test_invalid_settings_are_refused():
    task = EpisodeTask(_episodes())
    for bad in ({"finetune_lrs": []}, {"finetune_lrs": [-1e-3]}, {"finetune_steps": 0},
                {"select_episodes": 0}, {"distance": "manhattan"}):
        with pytest.raises(autometa.ConfigError, match="pmf"):
            PMF(_mlp(), task, **bad)
    assert "classification" in PMF.incompatibility(
        helpers.StubTask("regression", (IN,), 1))


def test_search_space_defaults_are_in_range():
    helpers.assert_search_space_defaults_in_range(PMF, "pmf")


@pytest.fixture(scope="module")
def digits() -> Digits:
    return Digits(ways=5, shots=1, queries=15, val_episodes=4, test_episodes=20)


@pytest.mark.parametrize("source, params, meta_train", [(MLP, {}, True), (MLP, {}, False),
                                                        (Conv4, {"channels": 8}, True)])
def test_conformance(digits, source, params, meta_train):
    check_meta_algorithm(PMF, digits, source, params, meta_train=meta_train, meta_lr=1e-3,
                         finetune_steps=3, select_episodes=2)


def test_meta_train_false_skips_meta_training_in_a_search(tmp_path):
    storage = f"sqlite:///{tmp_path / 'a.db'}"
    common = {"task_params": {"ways": 3, "shots": 1, "queries": 2, "val_episodes": 3,
                              "test_episodes": 3},
              "algorithms": ["pmf"], "sources": ["mlp"], "n_trials": 1, "meta_steps": 4,
              "eval_every": 4, "top_k": 1, "storage": storage, "baselines": False,
              "artifacts": str(tmp_path / "art")}
    steps = {}
    for meta_train in (False, True):
        board = autometa.search(
            "digits", study_name=f"pmf-{meta_train}", **common,
            algorithm_params={"pmf": {"meta_train": meta_train, "finetune_steps": 20,
                                      "finetune_lrs": [0, 1e-3], "select_episodes": 2}})
        [trial] = optuna.load_study(study_name=board.study_name,
                                    storage=open_storage(storage)).trials
        steps[meta_train] = trial.user_attrs["meta_steps"]
        model = board.model(1).meta_algorithm
        assert model.meta_trains is meta_train and model.finetune_lr in (0, 1e-3)
    assert steps == {False: 0, True: 4}


def test_a_cli_search_ranks_pmf_beside_the_baselines(tmp_path: Path) -> None:
    glyphs = {"ways": 3, "shots": 1, "queries": 3, "val_episodes": 3, "test_episodes": 4,
              "train_classes": 20, "val_classes": 5, "test_classes": 5, "examples": 4}
    result = subprocess.run(
        [sys.executable, "-m", "autometa", "run", "--task", "glyphs", "--algorithms", "pmf",
         "--sources", "conv4", "--trials", "2", "--meta-steps", "4", "--eval-every", "4",
         "--no-progress", "--top-k", "2", "--threads", "1",
         *(a for k, v in glyphs.items() for a in ("--task-param", f"{k}={v}")),
         "--param", "conv4.channels=32", "--param", "pmf.finetune_steps=20",
         "--param", "pmf.select_episodes=2"],
        cwd=tmp_path, capture_output=True, text=True, timeout=CLI_SEARCH,
        env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    frame = pd.read_csv(tmp_path / "autometa-reports" / "glyphs-seed0.csv")
    searched = frame[~frame["baseline"]]
    assert set(searched["algorithm"]) == {"pmf"} and len(searched) == 2
    assert frame["baseline"].sum() == 3
    assert searched["test_n"].max() == glyphs["test_episodes"]
    assert frame["rank"].notna().all()
    assert "pmf" in result.stdout and "nearest-centroid (baseline)" in result.stdout


def test_a_search_naming_no_algorithm_leaves_pmf_out(tmp_path):
    """pmf fine-tunes the whole backbone on every evaluation episode: it runs when named
    (``searched_by_default = False``), never in a search over every algorithm."""
    from autometa import SearchConfig
    from autometa.engine.prepare import prepare

    host = autometa.create_host()
    small = {"val_episodes": 2, "test_episodes": 2}
    every = prepare(SearchConfig(task="digits", task_params=small, sources=["mlp"]), host)
    assert "pmf" not in every.algorithms and "protonet" in every.algorithms
    named = prepare(SearchConfig(task="digits", task_params=small, sources=["mlp"],
                                 algorithms=["pmf"]), host)
    assert list(named.algorithms) == ["pmf"]


def test_a_source_without_parameters_is_refused_in_one_line():
    """The raw inputs have nothing to meta-train or fine-tune: one line, not an optimizer's
    "empty parameter list"."""
    from autometa_plugins.raw.model import Raw

    task = Digits(ways=3, shots=1, queries=2, val_episodes=2, test_episodes=2)
    model = Raw().build(task.spec)
    with pytest.raises(autometa.ConfigError, match=r"^pmf meta-trains and fine-tunes the "
                                                   r"source model's features, and these "
                                                   r"have no parameters"):
        PMF(model, task, distance="euclidean")
    # ... and a search naming that pair is refused before anything is stored.
    from autometa import SearchConfig
    from autometa.engine.prepare import prepare

    with pytest.raises(autometa.ConfigError, match=r"^algorithm 'pmf' cannot adapt source "
                                                   r"model 'raw' here: pmf meta-trains"):
        prepare(SearchConfig(task="digits", task_params={"val_episodes": 2,
                                                         "test_episodes": 2},
                             sources=["raw"], algorithms=["pmf"]), autometa.create_host())
