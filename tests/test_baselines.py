"""Baselines: the nearest-centroid and linear-svm algorithms and the raw source conform,
compute what scikit-learn and numpy compute on the same episodes, and every search runs them
first, outside its budget, marked on its leaderboard (README: Baselines)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
import torch
from limits import CLI_SEARCH
from sklearn.svm import LinearSVC

import autometa
from autometa.cli import main
from autometa.frozen import ABSENT_LOG_PROB
from autometa.model_inputs import read_inputs
from autometa.study.storage import open_storage
from autometa.task import Episodes
from autometa.testing import check_meta_algorithm, check_source_model
from autometa.trial import evaluate
from autometa_plugins.conv4.model import Conv4
from autometa_plugins.digits.task import Digits
from autometa_plugins.linear_svm.algorithm import LinearSVM
from autometa_plugins.nearest_centroid.algorithm import NearestCentroid
from autometa_plugins.raw.model import Raw
from autometa_plugins.sinusoid.task import Sinusoid

DIGITS = {"ways": 3, "shots": 2, "queries": 2, "val_episodes": 4, "test_episodes": 6}
BASELINES = ["nearest-centroid", "linear-probe", "linear-svm"]


@pytest.fixture(scope="module")
def digits() -> Digits:
    return Digits(**DIGITS)


@pytest.mark.parametrize("algorithm", [NearestCentroid, LinearSVM])
@pytest.mark.parametrize(("source", "params"), [(Raw, {}), (Conv4, {"channels": 8})])
def test_baseline_algorithms_conform(digits: Digits, algorithm: type, source: type,
                                     params: dict) -> None:
    check_meta_algorithm(algorithm, digits, source, params)


def test_their_other_settings_conform(digits: Digits) -> None:
    check_meta_algorithm(NearestCentroid, digits, Raw, metric="cosine", center=True)
    check_meta_algorithm(LinearSVM, digits, Raw, C=1e3, normalize=False)


def test_raw_serves_images_and_flat_inputs(digits: Digits) -> None:
    net = check_source_model(Raw, digits)
    assert list(net.features.parameters()) == []  # nothing to train in the features
    x = digits.meta_val()[:1].support_x[0]  # (n, 1, 8, 8)
    torch.testing.assert_close(net.features(x), x.flatten(1))
    check_source_model(Raw, Sinusoid(val_episodes=3, test_episodes=3, eval_queries=5))


def _raw(algorithm: type, task: Digits, **hyperparameters) -> object:
    return algorithm(Raw().build(task.spec).to(task.device), task, **hyperparameters)


def test_nearest_centroid_on_raw_pixels_is_nearest_class_mean(digits: Digits) -> None:
    """The same predictions and accuracy as nearest class mean written in numpy."""
    episodes = digits.meta_test()[:6]
    got = _raw(NearestCentroid, digits).adapt_and_predict(episodes).argmax(-1).numpy()
    for i in range(len(episodes)):
        xs = episodes.support_x[i].flatten(1).double().numpy()
        ys = episodes.support_y[i].numpy()
        xq = episodes.query_x[i].flatten(1).double().numpy()
        means = np.stack([xs[ys == c].mean(0) for c in range(digits.output_size)])
        expected = ((xq[:, None, :] - means[None]) ** 2).sum(-1).argmin(1)
        np.testing.assert_array_equal(got[i], expected)
    # The score the engine records (trial.evaluate): numpy's accuracy, episode by episode.
    scores = evaluate(_raw(NearestCentroid, digits), episodes, digits, split="meta-test")
    np.testing.assert_allclose(scores.numpy(), (got == episodes.query_y.numpy()).mean(1))


def test_linear_svm_on_raw_pixels_is_scikit_learns(digits: Digits) -> None:
    """The same decisions as LinearSVC fitted on the same episode's L2-normalised pixels."""
    episodes = digits.meta_test()[:6]
    got = _raw(LinearSVM, digits).adapt_and_predict(episodes).argmax(-1).numpy()
    for i in range(len(episodes)):
        xs = episodes.support_x[i].flatten(1).double().numpy()
        xq = episodes.query_x[i].flatten(1).double().numpy()
        xs, xq = (x / np.linalg.norm(x, axis=1, keepdims=True) for x in (xs, xq))
        svm = LinearSVC(C=1.0, dual=True, random_state=0).fit(xs, episodes.support_y[i].numpy())
        np.testing.assert_array_equal(got[i], svm.predict(xq))


@pytest.mark.parametrize("algorithm", [NearestCentroid, LinearSVM])
def test_a_class_absent_from_the_support_set_is_never_predicted(
        digits: Digits, algorithm: type) -> None:
    full = digits.meta_val()[:3]
    # Every episode without class 1 (2 support and 2 query examples of each of 0 and 2).
    keep_s, keep_q = full.support_y[0] != 1, full.query_y[0] != 1
    assert all(torch.equal(y != 1, keep_s) for y in full.support_y)
    episodes = Episodes(full.support_x[:, keep_s], full.support_y[:, keep_s],
                        full.query_x[:, keep_q], full.query_y[:, keep_q])
    out = _raw(algorithm, digits).adapt_and_predict(episodes)
    assert out.shape == (3, int(keep_q.sum()), digits.output_size)
    assert (out[..., 1] == ABSENT_LOG_PROB).all() and (out.argmax(-1) != 1).all()
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[..., [0, 2]].exp().sum(-1), torch.ones(out.shape[:2]))


# -- the engine: every search runs them ----------------------------------------------------
RUN = ["run", "--task", "digits", "--algorithms", "protonet", "--sources", "mlp",
       "--meta-steps", "2", "--eval-every", "2", "--no-progress", "--top-k", "1",
       *(a for k, v in DIGITS.items() for a in ("--task-param", f"{k}={v}"))]


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([sys.executable, "-m", "autometa", *args], cwd=cwd,
                            capture_output=True, text=True, timeout=CLI_SEARCH,
                            env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    return result


def test_a_cli_search_runs_the_baselines_outside_its_budget(tmp_path: Path) -> None:
    result = _cli(*RUN, "--trials", "2", cwd=tmp_path)
    frame = pd.read_csv(tmp_path / "autometa-reports" / "digits-seed0.csv")
    assert frame["baseline"].dtype == bool
    baselines = frame[frame["baseline"]]
    assert sorted(baselines["algorithm"]) == sorted(BASELINES)
    assert set(baselines["source"]) == {"raw"}  # mlp's random features are no baseline
    assert (~frame["baseline"]).sum() == 2  # --trials 2: two searched trials, as ever
    assert set(frame.loc[~frame["baseline"], "algorithm"]) == {"protonet"}
    # Every baseline has a meta-test score, whatever --top-k; one searched trial has.
    assert (baselines["test_n"] == DIGITS["test_episodes"]).all()
    assert baselines["tie_group"].notna().all()
    assert (frame.loc[~frame["baseline"], "test_n"] > 0).sum() == 1
    for name in BASELINES:
        assert f"{name} (baseline)" in result.stdout
    markdown = (tmp_path / "autometa-reports" / "digits-seed0.md").read_text()
    assert "nearest-centroid (baseline)" in markdown
    first = frame.iloc[0]
    sentence = "A baseline ranks first: meta-learning did not beat"
    assert (sentence in result.stdout) == bool(first["baseline"])
    assert (sentence in markdown) == bool(first["baseline"])

    storage = open_storage(f"sqlite:///{tmp_path / 'autometa.db'}")
    trials = optuna.load_study(study_name="digits-seed0", storage=storage).trials
    assert [t.user_attrs.get("baseline", False) for t in trials] == [True] * 3 + [False] * 2
    assert all(t.params == {} for t in trials[:3])  # nothing sampled for a baseline

    # A resume to 3 trials runs one more searched trial and no baseline again.
    _cli(*RUN, "--trials", "3", cwd=tmp_path)
    frame = pd.read_csv(tmp_path / "autometa-reports" / "digits-seed0.csv")
    assert frame["baseline"].sum() == 3 and (~frame["baseline"]).sum() == 3

    # --no-baselines: none.
    _cli(*RUN, "--trials", "2", "--no-baselines", "--study", "plain", cwd=tmp_path)
    frame = pd.read_csv(tmp_path / "autometa-reports" / "plain.csv")
    assert not frame["baseline"].any() and len(frame) == 2


def test_a_baseline_is_served_like_any_trial(tmp_path: Path, capsys) -> None:
    """`autometa predict --rank` and Leaderboard.model(rank) of a baseline trial."""
    board = autometa.search("iris", algorithms=["protonet"], sources=["mlp"], n_trials=1,
                            meta_steps=2, eval_every=2, top_k=1, study_name="flowers")
    frame = board.frame
    assert frame["baseline"].sum() == 3
    html = board.report(tmp_path / "report").read_text()
    assert "linear-svm (baseline)" in html
    assert ("A baseline ranks first" in html) == bool(frame["baseline"].iloc[0])
    assert ("A baseline ranks first" in board.to_markdown()) == bool(frame["baseline"].iloc[0])
    rank = int(frame.loc[frame["algorithm"] == "linear-svm", "rank"].iloc[0])
    model = board.model(rank)
    assert type(model.meta_algorithm).__name__ == "LinearSVM"
    rows = np.random.default_rng(0).normal(size=(5, 4))
    pd.DataFrame(rows, columns=list("abcd")).to_csv(tmp_path / "new.csv", index=False)
    assert main(["predict", "flowers", "--rank", str(rank), "--input", "new.csv",
                 "--out", "p.csv"]) == 0
    out = pd.read_csv(tmp_path / "p.csv")
    probs = out[["p_setosa", "p_versicolor", "p_virginica"]].to_numpy()
    x, _, _ = read_inputs(model.task, tmp_path / "new.csv")  # as the CLI reads them
    np.testing.assert_allclose(probs, model.predict(x).probabilities.numpy(), atol=1e-6)
    capsys.readouterr()


def test_pretrained_sources_get_baselines_too_and_regression_none(tmp_path: Path) -> None:
    board = autometa.search(
        "digits", task_params=DIGITS, algorithms=["protonet"], sources=["mlp", "pretrained"],
        source_params={"pretrained": {"backbone": "mlp", "steps": 2}}, n_trials=1,
        meta_steps=2, eval_every=2, top_k=1, cache_dir=str(tmp_path / "cache"))
    baselines = board.frame[board.frame["baseline"]]
    assert sorted(zip(baselines["source"], baselines["algorithm"], strict=True)) == sorted(
        (s, a) for s in ("raw", "pretrained") for a in BASELINES)
    assert (~board.frame["baseline"]).sum() == 1

    board = autometa.search("sinusoid", algorithms=["maml"], sources=["mlp"], n_trials=1,
                            meta_steps=2, eval_every=2, study_name="waves",
                            task_params={"val_episodes": 3, "test_episodes": 3,
                                         "eval_queries": 5})
    assert not board.frame["baseline"].any() and len(board.frame) == 1


def test_a_search_naming_no_plugins_leaves_the_baseline_only_ones_to_the_baselines(
        tmp_path: Path) -> None:
    """Nearest centroid, the linear SVM and `raw` are searched only when named: their
    trials at defaults are the baselines, and searching them spent the budget twice."""
    from autometa import create_host
    from autometa.config import SearchConfig
    from autometa.engine.prepare import prepare

    host = create_host()
    unnamed = prepare(SearchConfig(task="digits", task_params=DIGITS,
                                   cache_dir=str(tmp_path)), host)
    assert not {"nearest-centroid", "linear-svm"} & set(unnamed.algorithms)
    assert {"protonet", "maml", "linear-probe"} <= set(unnamed.algorithms)
    assert "raw" not in unnamed.sources and "conv4" in unnamed.sources
    named = prepare(SearchConfig(task="digits", task_params=DIGITS, cache_dir=str(tmp_path),
                                 algorithms=["nearest-centroid", "linear-svm"],
                                 sources=["raw"]), host)
    assert set(named.algorithms) == {"nearest-centroid", "linear-svm"}
    assert set(named.sources) == {"raw"}


def _trial(number: int, value: float, scores: list[float], baseline: bool = False):
    from optuna.distributions import FloatDistribution
    from optuna.trial import create_trial

    return create_trial(value=value, params={"x": 0.5},
                        distributions={"x": FloatDistribution(0, 1)},
                        user_attrs={"baseline": baseline, "val_scores": scores,
                                    "algorithm": "linear-svm" if baseline else "maml"})


def test_a_searched_trial_ranks_above_the_best_baseline_only_if_it_beats_it_on_meta_val(
        ) -> None:
    """Issue 23's search: every trial within noise of the baselines on meta-val (0.92),
    while the baselines were better on meta-test. A searched trial must show, on the
    paired meta-val episodes, that meta-learning pays before it ranks above them."""
    from scipy.stats import wilcoxon

    from autometa.study.trials import ranked_trials

    rng = np.random.default_rng(0)
    base = rng.uniform(0.6, 0.9, size=100)
    noise = rng.normal(0, 0.05, size=100)
    study = optuna.create_study(direction="maximize")
    marginal = np.clip(base + 0.004 + noise, 0, 1)  # ahead on the mean, not significantly
    clear = np.clip(base + 0.05 + noise / 5, 0, 1)
    for number, scores, baseline in ((0, base, True), (1, base - 0.1, True),
                                     (2, marginal, False), (3, clear, False)):
        study.add_trial(_trial(number, float(scores.mean()), scores.tolist(), baseline))
    assert marginal.mean() > base.mean()
    assert wilcoxon(marginal - base, alternative="greater").pvalue > 0.05
    order = [t.number for t in ranked_trials(study)]
    assert order == [3, 0, 2, 1]  # clear, then the best baseline, then the marginal one

    # Minimised metrics: the same rule, the other way round.
    study = optuna.create_study(direction="minimize")
    for number, scores, baseline in ((0, base, True), (2, base - 0.004 + noise, False)):
        study.add_trial(_trial(number, float(scores.mean()), scores.tolist(), baseline))
    assert [t.number for t in ranked_trials(study)] == [0, 1]

    # Without paired scores (a study stored before they were): meta-val order, as ever.
    study = optuna.create_study(direction="maximize")
    for number, scores, baseline in ((0, base, True), (1, marginal, False)):
        trial = _trial(number, float(scores.mean()), [], baseline)
        study.add_trial(trial)
    assert [t.number for t in ranked_trials(study)] == [1, 0]


def test_every_trial_of_a_search_records_its_paired_meta_val_scores(tmp_path: Path) -> None:
    """A real search: each trial stores its final meta-val score per episode, their mean
    is its value, and the leaderboard's order follows the baseline rule."""
    from scipy.stats import wilcoxon

    board = autometa.search("digits", task_params=DIGITS, algorithms=["protonet"],
                            sources=["mlp"], n_trials=3, meta_steps=4, eval_every=2,
                            top_k=1, storage=f"sqlite:///{tmp_path / 's.db'}",
                            artifacts=str(tmp_path / "art"), pruner="none")
    study = optuna.load_study(study_name="digits-seed0", storage=f"sqlite:///{tmp_path / 's.db'}")
    trials = {t.number: t for t in study.trials}
    for t in trials.values():
        scores = t.user_attrs["val_scores"]
        assert len(scores) == DIGITS["val_episodes"]
        assert np.mean(scores) == pytest.approx(t.value, abs=1e-6)
    frame = board.frame
    first_baseline = int(frame.index[frame["baseline"]][0])
    reference = np.array(trials[int(frame["trial"][first_baseline])].user_attrs["val_scores"])
    for row in frame.itertuples():
        if row.baseline or row.Index > first_baseline:
            continue
        gains = np.array(trials[row.trial].user_attrs["val_scores"]) - reference
        assert gains.any() and wilcoxon(gains, alternative="greater").pvalue < 0.05


def test_under_the_wilcoxon_pruner_the_per_episode_reports_are_the_paired_scores() -> None:
    from optuna.distributions import FloatDistribution
    from optuna.trial import create_trial

    from autometa.study.trials import val_scores

    reports = {episode: 0.5 + episode / 100 for episode in range(20)}
    trial = create_trial(value=0.6, params={"x": 0.5},
                         distributions={"x": FloatDistribution(0, 1)},
                         intermediate_values=reports, user_attrs={"val_curve": [[10, 0.6]]})
    assert val_scores(trial) == [reports[e] for e in range(20)]
    learning_curve = create_trial(value=0.6, params={"x": 0.5},
                                  distributions={"x": FloatDistribution(0, 1)},
                                  intermediate_values={10: 0.5, 20: 0.6})
    assert val_scores(learning_curve) is None  # a learning curve pairs with nothing
