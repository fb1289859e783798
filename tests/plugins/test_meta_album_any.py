"""meta-album's any-way any-shot episodes (``ways="any"``, ``shots="any"``): fixed episodes
of several sizes held as indices (``autometa.task.MixedEpisodes``), scored in episode order
(plain evaluation, the Wilcoxon pruner's paired order, per domain), the loss and accuracy
over each episode's own classes, bad settings, and a search through the CLI.

The datasets are test_meta_album's: solid 8x8 images whose red channel names the domain
and green the class.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from limits import CLI_SEARCH
from test_meta_album import DOMAINS, SMALL, make_album, where, write_domain

import autometa
import autometa.trial as trial
from autometa import ConfigError, DataError, Episodes, create_host
from autometa.cli import main
from autometa.inner_loop import meta_backward
from autometa.metrics import episode_loss, mask_absent
from autometa.task import IndexedEpisodes, MixedEpisodes
from autometa.testing import check_meta_algorithm, check_task
from autometa_plugins.maml.algorithm import MAML
from autometa_plugins.meta_album.task import MetaAlbum
from autometa_plugins.mlp.model import MLP
from autometa_plugins.protonet.algorithm import ProtoNet

#: 12 classes a domain split 6 / 3 / 3, 8 images each: meta-train episodes of 2-6 ways
#: and 1-6 shots, meta-val/meta-test 2-3 ways; 2 queries per class.
ANY = {**SMALL, "ways": "any", "shots": "any", "val_fraction": 0.25, "test_fraction": 0.25,
       "val_episodes": 24, "test_episodes": 15}


@pytest.fixture(scope="module")
def album(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_album(tmp_path_factory.mktemp("any") / "album", classes=12, per_class=8)


def any_task(album: Path, **params: object) -> MetaAlbum:
    return MetaAlbum(path=album, **{**ANY, **params})  # type: ignore[arg-type]


def test_fixed_episodes_differ_in_size_and_are_indices(album: Path) -> None:
    task = check_task(MetaAlbum, path=str(album), **ANY)
    assert task.output_size == 6 and task.any_ways  # the largest N: 6 meta-train classes
    assert task.describe()["episodes"] == {"ways": "any", "shots": "any", "queries": 2,
                                           "max_ways": 6, "max_shots": 6}
    for split, episodes in (("meta-val", task.meta_val()), ("meta-test", task.meta_test())):
        assert isinstance(episodes, MixedEpisodes)
        assert all(isinstance(g, IndexedEpisodes) and g.support.dtype == torch.long
                   for g in episodes.groups)  # indices, never images
        sizes = episodes.sizes()
        assert len(set(sizes)) > 2, sizes
        names = task.episode_domains(split)
        assert names is not None and len(names) == len(episodes)
        for i, (n_support, n_query) in enumerate(sizes):
            one = episodes[i : i + 1]
            assert isinstance(one, Episodes)
            ways, shots = n_query // 2, n_support // (n_query // 2)
            assert 2 <= ways <= 3 and 1 <= shots <= 6  # capped by the split: 3 classes, 8 - 2
            assert one.support_y[0].tolist() == [c for c in range(ways) for _ in range(shots)]
            domain, cls = where(torch.cat([one.support_x, one.query_x], 1))
            assert (domain == domain[0, 0]).all()
            assert names[i] == sorted(DOMAINS)[int(domain[0, 0])]
            assert len(set(cls[0].tolist())) == ways
    ways = {n_query // 2 for _, n_query in task.meta_test().sizes()}
    assert ways == {2, 3}


def test_the_same_seed_gives_the_same_episodes_and_indexing_keeps_their_order(
        album: Path) -> None:
    a, b, c = any_task(album), any_task(album), any_task(album, seed=1)
    for x, y in ((a.meta_val(), b.meta_val()), (a.meta_test(), b.meta_test())):
        assert x.sizes() == y.sizes()
        for i in range(len(x)):
            assert torch.equal(x[i].support_x, y[i].support_x)
            assert torch.equal(x[i].query_y, y[i].query_y)
    assert a.meta_val().sizes() != c.meta_val().sizes()
    ids = torch.tensor([5, 0, 17, 3])
    subset = a.meta_val()[ids]
    assert isinstance(subset, MixedEpisodes)
    assert subset.sizes() == [a.meta_val().sizes()[i] for i in ids.tolist()]
    for k, i in enumerate(ids.tolist()):
        assert torch.equal(subset[k].query_x, a.meta_val()[i].query_x)
    with pytest.raises(TypeError, match="differ in size"):
        _ = a.meta_val().support_x
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    one, two = a.sample(5, g1), b.sample(5, g2)
    assert torch.equal(one.support_x, two.support_x) and torch.equal(one.query_y, two.query_y)


def _fingerprint(task: MetaAlbum) -> str:
    h = hashlib.sha256()
    for episodes in (task.meta_val(), task.meta_test()):
        assert isinstance(episodes, IndexedEpisodes)
        for t in (episodes.support, episodes.query, episodes.support_y, episodes.query_y):
            h.update(t.numpy().tobytes())
    batch = task.sample(7, torch.Generator().manual_seed(0))
    h.update((batch.support_x * 255).round().to(torch.uint8).numpy().tobytes())
    h.update((batch.query_x * 255).round().to(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def test_numbers_of_ways_and_shots_draw_what_they_drew_before(album: Path) -> None:
    """Fixed ways and shots: the episodes autometa 80ad761 drew (before "any" existed)."""
    task = any_task(album, ways=3, shots=2)
    assert task.output_size == 3 and not task.any_ways
    assert _fingerprint(task) == "531f84d992e66dc2"


def test_meta_train_batches_share_one_size_capped_by_their_domains(album: Path) -> None:
    task = any_task(album)
    g = torch.Generator().manual_seed(0)
    drawn = set()
    for _ in range(30):
        batch = task.sample(4, g)
        ways = int(batch.support_y.max()) + 1
        shots = batch.support_x.shape[1] // ways
        assert batch.query_x.shape[1] == ways * 2 and 2 <= ways <= 6 and 1 <= shots <= 6
        domain, _ = where(torch.cat([batch.support_x, batch.query_x], 1))
        assert (domain == domain[:, :1]).all()
        drawn.add((ways, shots))
    assert len({w for w, _ in drawn}) >= 3 and len({k for _, k in drawn}) >= 3


def _protonet(task: MetaAlbum) -> ProtoNet:
    torch.manual_seed(0)
    return ProtoNet(MLP(hidden=16).build(task.spec), task)


def _maml(task: MetaAlbum) -> MAML:
    torch.manual_seed(0)
    return MAML(MLP(hidden=16).build(task.spec), task, meta_batch_size=2, strategy="loop")


@pytest.mark.parametrize("make", [_protonet, _maml], ids=["protonet", "maml"])
def test_evaluate_scores_each_episode_as_alone_in_episode_order(
        album: Path, make, monkeypatch: pytest.MonkeyPatch) -> None:
    task = any_task(album)
    algorithm = make(task)
    algorithm.meta_step(task.sample(2, torch.Generator().manual_seed(0)))
    episodes = task.meta_test()
    monkeypatch.setattr(trial, "EVAL_CHUNK", 2)  # several chunks per size
    scores = trial.evaluate(algorithm, episodes, task)
    alone = torch.stack([trial.evaluate(algorithm, episodes[i : i + 1], task).mean()
                         for i in range(len(episodes))])
    assert scores.shape == (len(episodes),)
    torch.testing.assert_close(scores, alone)
    # per domain: the episodes' scores grouped by their recorded domain
    names = task.episode_domains("meta-test")
    assert names is not None
    for name in DOMAINS:
        mine = torch.tensor([n == name for n in names])
        torch.testing.assert_close(scores[mine].mean(), alone[mine].mean())
    check_meta_algorithm(type(algorithm), task, MLP, {"hidden": 16},
                         **({"meta_batch_size": 2} if make is _maml else {}))


def test_the_wilcoxon_pruners_paired_order_scores_mixed_sets(album: Path) -> None:
    task = any_task(album)
    algorithm = _protonet(task)
    reported: dict[int, float] = {}
    mean = trial.paired_val_score(algorithm, task, generator=torch.Generator().manual_seed(1),
                                  report=reported.__setitem__, should_stop=lambda: False,
                                  chunk=5)
    scores = trial.evaluate(algorithm, task.meta_val(), task)
    assert sorted(reported) == list(range(len(task.meta_val())))
    torch.testing.assert_close(torch.tensor([reported[i] for i in range(len(reported))]),
                               scores.cpu())
    assert mean == pytest.approx(float(scores.mean()))
    with pytest.raises(trial.EvaluationPruned) as stopped:
        trial.paired_val_score(algorithm, task, generator=torch.Generator().manual_seed(1),
                               report=lambda i, s: None, should_stop=lambda: True, chunk=5)
    assert stopped.value.evaluated == 5


def test_the_loss_and_accuracy_leave_absent_classes_out() -> None:
    """Against an independent reference: cross-entropy over the episode's N logits."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 8, 6, generator=g, dtype=torch.float64)  # (tasks, n, out)
    target = torch.arange(4).repeat(2).expand(3, 8)  # 4-way episodes of output 6
    reference = F.cross_entropy(logits[..., :4].reshape(-1, 4), target.reshape(-1))
    torch.testing.assert_close(episode_loss(logits, target), reference)
    grads = torch.func.grad(episode_loss)(logits, target)
    assert (grads[..., 4:] == 0).all() and (grads[..., :4] != 0).any()
    per_task = torch.func.vmap(torch.func.grad(episode_loss), in_dims=(0, 0))(logits, target)
    assert (per_task[..., 4:] == 0).all()
    big = logits.clone()
    big[..., 5] = 1e9  # an absent class with the largest logit is never the argmax
    assert int(mask_absent(big, target).argmax(-1).max()) < 4
    every = torch.tensor([[0, 1, 2, 3, 4, 5, 0, 1]])  # every class present: plain loss
    torch.testing.assert_close(episode_loss(logits[:1], every),
                               F.cross_entropy(logits[0], every[0]))


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
def test_mamls_head_rows_of_absent_classes_get_no_gradient(album: Path, strategy: str
                                                           ) -> None:
    task = any_task(album)
    algorithm = _maml(task)
    algorithm.strategy = strategy
    batch = task.sample(3, torch.Generator().manual_seed(4))
    ways = int(batch.support_y.max()) + 1
    assert ways < task.output_size
    algorithm.model.zero_grad(set_to_none=True)
    meta_backward(algorithm.model, batch, task.loss, **algorithm.inner_loop_options())
    head = algorithm.model.head
    assert (head.weight.grad[ways:] == 0).all() and (head.bias.grad[ways:] == 0).all()
    assert (head.weight.grad[:ways] != 0).any()


@pytest.mark.parametrize("name", ["anil", "metasgd", "reptile", "finetune", "linear-probe"])
def test_every_other_algorithm_serves_mixed_episodes(album: Path, name: str) -> None:
    """Each meta-steps on an any-way batch and adapts to meta-val episodes of one size
    (the conformance kit), and evaluate scores the whole mixed set."""
    task = any_task(album)
    cls = create_host().get("algorithm", name).load()
    check_meta_algorithm(cls, task, MLP, {"hidden": 16})
    torch.manual_seed(0)
    algorithm = cls(MLP(hidden=16).build(task.spec), task)
    scores = trial.evaluate(algorithm, task.meta_val(), task)
    assert scores.shape == (len(task.meta_val()),) and bool(torch.isfinite(scores).all())


@pytest.mark.parametrize(("params", "error", "expected"), [
    ({"max_ways": 1}, ConfigError, "max_ways=1 is below 2"),
    ({"ways": "some"}, ConfigError, "ways='some' is neither a whole number from 2 nor 'any'"),
    ({"shots": 0}, ConfigError, "shots=0 is neither"),
    ({"val_fraction": 0.05, "test_fraction": 0.25}, DataError,
     "has 1 meta-val class(es), fewer than 2 (ways=any draws 2 to max_ways)"),
    ({"queries": 8}, DataError, "fewer than 1 shot (shots=any) + queries = 9"),
])
def test_bad_any_way_settings_are_one_clear_error(album: Path, params: dict[str, object],
                                                  error: type[Exception], expected: str) -> None:
    with pytest.raises(error) as raised:
        any_task(album, **params)
    message = str(raised.value)
    assert message.startswith("meta-album: ") and "\n" not in message and expected in message


def _argv(root: Path, *extra: str, **params: object) -> list[str]:
    settings = {**ANY, "path": str(root), **params}
    return ["run", "--task", "meta-album",
            *(a for k, v in settings.items() for a in ("--task-param", f"{k}={v}")),
            "--algorithms", "protonet,maml", "--sources", "mlp", "--param", "mlp.hidden=40",
            "--param", "maml.meta_batch_size=4", "--trials", "2", "--meta-steps", "2",
            "--eval-every", "2", "--threads", "1", "--no-progress", "--no-baselines", *extra]


@pytest.mark.parametrize(("params", "expected"), [
    ({"val_fraction": 0.05, "test_fraction": 0.25}, "fewer than 2 (ways=any draws 2 to max_ways)"),
    ({"max_ways": 1}, "task_params.max_ways: 1 is outside [2, 1000]"),  # its declared range
    ({"ways": "few"}, "meta-album: ways='few' is neither a whole number from 2 nor 'any'"),
])
def test_cli_bad_any_way_input_exits_2_in_one_line(
        album: Path, tmp_path: Path, params: dict[str, object], expected: str,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(_argv(album, **params)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("autometa: error: "), err
    assert expected in err[0]
    assert not (tmp_path / "autometa.db").exists()


@pytest.mark.parametrize("pruner", ["hyperband", "wilcoxon"])
def test_cli_search_any_way_any_shot_scores_every_domain(album: Path, tmp_path: Path,
                                                         pruner: str) -> None:
    """`autometa run` with ways=any shots=any, ProtoNet and MAML: each ranked trial scored
    on meta-test, one per-domain row per domain and trial. The Wilcoxon pruner pairs the
    mixed meta-val episodes (it may stop the worse trial, which is then not ranked)."""
    result = subprocess.run(
        [sys.executable, "-m", "autometa", *_argv(album, "--study", "any", "--pruner", pruner)],
        cwd=tmp_path, env={**os.environ, "COLUMNS": "200",
                           "AUTOMETA_CACHE_DIR": str(tmp_path / "cache")},
        capture_output=True, text=True, timeout=CLI_SEARCH)
    assert result.returncode == 0, result.stderr
    study = optuna.load_study(study_name="any", storage=f"sqlite:///{tmp_path / 'autometa.db'}")
    assert {t.params["algorithm"] for t in study.trials
            if t.state == optuna.trial.TrialState.COMPLETE} == {"maml", "protonet"}
    reports = tmp_path / "autometa-reports"
    frame = pd.read_csv(reports / "any.csv")
    domains = pd.read_csv(reports / "any-domains.csv")
    pruned = [t for t in study.trials if "pruned" in t.user_attrs]
    # an algorithm left with no fully trained trial has its best configuration re-run in full
    completions = [t for t in study.trials if t.user_attrs.get("completion")]
    assert len(completions) <= len(pruned)
    assert len(frame) == 2 - len(pruned) + len(completions)
    assert pruner == "wilcoxon" or not pruned
    assert all("of 24 meta-val episodes" in t.user_attrs["pruned"] for t in pruned)
    scored = frame[frame["test_n"] > 0]
    assert len(scored) == len(frame) and len(domains) == len(frame) * 3
    for row in scored.itertuples():
        mine = domains[domains["trial"] == row.trial]
        assert list(mine["domain"]) == sorted(DOMAINS) and (mine["test_n"] == 5).all()
        assert float((mine["test_accuracy"] * mine["test_n"]).sum() / 15) == \
            pytest.approx(row.test_accuracy)
    assert "any: meta-test accuracy per domain" in result.stdout
    if pruner == "hyperband":  # the best model adapts to a 3-way support set of output 6
        model = autometa.load_model("any", 1, storage=f"sqlite:///{tmp_path / 'autometa.db'}",
                                    artifacts=str(tmp_path / "autometa-artifacts"),
                                    data_root=str(tmp_path))
        new = write_domain(tmp_path, "NEW", 130, classes=3, per_class=3)
        predicted = model.adapt(new).predict(new / "images")
        assert predicted.classes == ["class 0", "class 1", "class 2"]
        assert predicted.probabilities.shape == (9, 3) and len(predicted.labels) == 9
        one = write_domain(tmp_path / "one", "ONE", 130, classes=1, per_class=3)
        with pytest.raises(DataError, match="2- to 6-way episodes; give examples of 2 to 6"):
            model.adapt(one)
