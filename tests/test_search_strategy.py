"""Search strategies users choose: pruners (median, Hyperband, Wilcoxon), the portfolio
start, and warm start from earlier studies.

Pruners are checked on a scripted sequence of configurations: an earlier search's
study gets Optuna's own queued trials (``enqueue_trial``, as an Optuna user would queue
them), then a resumed ``autometa.search`` runs them in order.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState

import autometa
from autometa.cli import main
from autometa.engine.sampling import WILCOXON_STARTUP

#: A MAML that learns within 150 meta-steps, and one that cannot (tiny meta- and inner
#: step sizes): the bad one's meta-val MSE stays near that of predicting 0 (~3.5 against
#: ~1.8 for the good one, measured).
GOOD = {"maml.meta_lr": 0.01, "maml.inner_lr": 0.05}
BAD = {"maml.meta_lr": 1e-4, "maml.inner_lr": 0.001}
VAL_EPISODES = 30
SETTINGS: dict[str, Any] = {
    "algorithms": ["maml"], "sources": ["mlp"],
    "algorithm_params": {"maml": {"meta_lr": [1e-4, 0.01], "inner_lr": [0.001, 0.05],
                                  "inner_steps": 1, "meta_batch_size": 10,
                                  "first_order": False}},
    "source_params": {"mlp": {"hidden": 40, "layers": 2}},
    "meta_steps": 150, "eval_every": 50, "top_k": 1, "seed": 0, "initial": "none",
    "task_params": {"val_episodes": VAL_EPISODES, "test_episodes": 5, "eval_queries": 20},
}


def scripted(tmp_path: Path, pruner: str, sequence: list[dict[str, Any]]
             ) -> tuple[autometa.Leaderboard, list[optuna.trial.FrozenTrial]]:
    """One sampled trial, then ``sequence`` queued and run in order; the leaderboard and
    every trial."""
    settings = {**SETTINGS, "pruner": pruner, "study_name": pruner,
                "storage": f"sqlite:///{tmp_path / 's.db'}",
                "artifacts": str(tmp_path / "art")}
    autometa.search("sinusoid", n_trials=1, **settings)
    study = optuna.load_study(study_name=pruner, storage=settings["storage"])
    for params in sequence:
        study.enqueue_trial(params)
    board = autometa.search("sinusoid", n_trials=1 + len(sequence), **settings)
    return board, study.get_trials()


def is_good(trial: optuna.trial.FrozenTrial) -> bool:
    return trial.params["maml.meta_lr"] == GOOD["maml.meta_lr"]


def stopped(trial: optuna.trial.FrozenTrial) -> bool:
    return trial.state == TrialState.PRUNED or bool(trial.user_attrs.get("pruned"))


@pytest.mark.parametrize("pruner", ["median", "hyperband", "wilcoxon"])
def test_each_pruner_stops_a_bad_configuration_and_never_the_best(tmp_path: Path,
                                                                    pruner: str) -> None:
    # The median rule waits for 5 complete trials: good ones first, then bad and good.
    board, trials = scripted(tmp_path, pruner, [GOOD] * 5 + [BAD, GOOD, BAD])
    bad = [t for t in trials if not is_good(t)]
    assert any(stopped(t) for t in bad), [(t.number, t.state.name, t.value) for t in trials]
    best = board.best
    best_trial = trials[int(best["trial"])]
    assert is_good(best_trial) and not stopped(best_trial)
    # The best of all the configurations that ran to the end is the one ranked first.
    finished = [t for t in trials if t.state == TrialState.COMPLETE and not stopped(t)]
    assert best_trial.value == min(t.value for t in finished)
    # Nothing stopped is ranked, and no trial is stopped after its last evaluation
    # (its meta-training is spent by then).
    assert not set(board.frame["trial"]) & {t.number for t in trials if stopped(t)}
    for t in trials:
        if t.state == TrialState.PRUNED:
            assert t.user_attrs["meta_steps"] < SETTINGS["meta_steps"]
    assert board.counts["pruned"] == sum(stopped(t) for t in trials)


def test_the_wilcoxon_pruner_pairs_episodes_and_returns_the_running_mean(tmp_path):
    board, trials = scripted(tmp_path, "wilcoxon", [GOOD, BAD])
    pruned = [t for t in trials if t.user_attrs.get("pruned")]
    assert pruned and all(not is_good(t) for t in pruned)
    for t in pruned:
        # Told COMPLETE with the mean of the episodes it was scored on (Optuna's advice),
        # each reported with its fixed episode index as the step.
        assert t.state == TrialState.COMPLETE
        steps = sorted(t.intermediate_values)
        assert set(steps) <= set(range(VAL_EPISODES))
        assert WILCOXON_STARTUP <= len(steps) < VAL_EPISODES
        assert t.value == pytest.approx(sum(t.intermediate_values.values()) / len(steps),
                                        rel=1e-5)
        assert f"after {len(steps)} of {VAL_EPISODES} meta-val episodes" in \
            t.user_attrs["pruned"]
        assert t.user_attrs["meta_steps"] == SETTINGS["meta_steps"]  # trained in full
    full = [t for t in trials if not t.user_attrs.get("pruned")]
    for t in full:
        assert sorted(t.intermediate_values) == list(range(VAL_EPISODES))
        # The learning curve is kept beside the per-episode scores.
        assert [s for s, _ in t.user_attrs["val_curve"]] == [50, 100, 150]
    # A stopped trial was scored on a shuffled subset, not the first episodes.
    assert all(sorted(t.intermediate_values) != list(range(len(t.intermediate_values)))
               for t in pruned)
    assert list(board.frame["trial"]) == sorted((t.number for t in full),
                                                key=lambda n: trials[n].value)
    # The report draws the learning curves (meta-steps), not the per-episode scores.
    html = board.report(tmp_path / "reports").read_text()
    assert "Learning curves" in html and "reported a meta-val score" not in html


def test_warm_start_runs_the_best_earlier_configurations_first(tmp_path: Path, caplog
                                                              ) -> None:
    storage = f"sqlite:///{tmp_path / 's.db'}"
    maml = {"meta_lr": {"low": 1e-4, "high": 0.01}, "inner_lr": 0.01, "inner_steps": 1,
            "meta_batch_size": 4}
    common = {**SETTINGS, "meta_steps": 20, "eval_every": 20, "pruner": "none",
              "storage": storage, "artifacts": str(tmp_path / "art"),
              "algorithm_params": {"maml": maml}}
    earlier = autometa.search("sinusoid", study_name="earlier", n_trials=5, **common)
    best3 = list(earlier.frame["trial"][:3])
    old = {t.number: t for t in optuna.load_study(study_name="earlier",
                                                  storage=storage).trials}
    # Another task (5 shots), another storage given as study@url.
    other = f"sqlite:///{tmp_path / 'other.db'}"
    autometa.search("sinusoid", **{**common, "storage": other, "seed": 1,
                                   "task_params": {**common["task_params"], "shots": 5}},
                    study_name="five-shot", n_trials=2)
    autometa.search("sinusoid", study_name="warm", n_trials=6,
                    warm_start=["earlier", f"five-shot@{other}"], **common)
    trials = optuna.load_study(study_name="warm", storage=storage).trials
    for new, number in zip(trials, best3, strict=False):
        assert new.params == old[number].params
        assert new.user_attrs["origin"] == f"warm start from earlier trial {number}"
    for t in trials[3:5]:  # the other study's two trials, best first
        assert t.user_attrs["origin"].startswith("warm start from five-shot trial")
    assert "origin" not in trials[5].user_attrs  # then the sampler
    # A resume queues nothing again.
    autometa.search("sinusoid", study_name="warm", n_trials=7,
                    warm_start=["earlier", f"five-shot@{other}"], **common)
    assert sum("origin" in t.user_attrs
               for t in optuna.load_study(study_name="warm", storage=storage).trials) == 5
    # A configuration outside this search's space is skipped, with a line saying why.
    lowest = min(old[n].params["maml.meta_lr"] for n in best3)
    narrowed = {**maml, "meta_lr": {"low": lowest * 1.01, "high": 0.01}}
    caplog.set_level(logging.WARNING)
    autometa.search("sinusoid", study_name="narrow", n_trials=3, warm_start=["earlier"],
                    **{**common, "algorithm_params": {"maml": narrowed}})
    skipped = next(n for n in best3 if old[n].params["maml.meta_lr"] == lowest)
    assert f"warm start from earlier trial {skipped} skipped: maml.meta_lr=" in caplog.text
    # ... and the next best that fits is taken instead.
    fits = [n for n in earlier.frame["trial"] if old[n].params["maml.meta_lr"] > lowest]
    narrow = optuna.load_study(study_name="narrow", storage=storage).trials
    assert [t.user_attrs.get("origin") for t in narrow] == [
        f"warm start from earlier trial {n}" for n in fits[:3]]


def test_a_warm_start_from_the_command_line(tmp_path: Path, capsys) -> None:
    base = ["run", "--task", "sinusoid", "--algorithms", "maml", "--sources", "mlp",
            "--meta-steps", "2", "--eval-every", "2", "--storage",
            f"sqlite:///{tmp_path / 's.db'}", "--artifacts", str(tmp_path / "art"),
            "--out", str(tmp_path / "out"), "--no-progress", "--task-param",
            "val_episodes=12", "--task-param", "test_episodes=2", "--top-k", "1"]
    assert main([*base, "--study", "a", "--trials", "3"]) == 0
    assert main([*base, "--study", "b", "--trials", "1", "--warm-start", "a",
                 "--pruner", "wilcoxon"]) == 0
    storage = f"sqlite:///{tmp_path / 's.db'}"
    first = optuna.load_study(study_name="b", storage=storage).trials[0]
    best = optuna.load_study(study_name="a", storage=storage).best_trial
    assert first.params == best.params
    assert first.user_attrs["origin"] == f"warm start from a trial {best.number}"


def test_the_portfolio_runs_every_pair_at_its_defaults_first(tmp_path: Path,
                                                             caplog) -> None:
    from autometa.plugins import create_host

    algorithms, sources = ["protonet", "maml", "anil"], ["mlp", "conv4"]
    settings = {
        "task_params": {"ways": 3, "shots": 1, "queries": 2, "val_episodes": 3,
                        "test_episodes": 3},
        "algorithms": algorithms, "sources": sources, "meta_steps": 2, "eval_every": 2,
        "top_k": 1, "initial": "portfolio", "storage": f"sqlite:///{tmp_path / 's.db'}",
        "artifacts": str(tmp_path / "art"),
        # A default outside a narrowed range is left to the sampler.
        "algorithm_params": {"maml": {"inner_lr": {"low": 0.1, "high": 0.5}}},
        "baselines": False,  # trial numbers from 0 are the portfolio's (test_baselines.py)
    }
    autometa.search("digits", study_name="all", n_trials=7, **settings)
    trials = optuna.load_study(study_name="all", storage=settings["storage"]).trials
    pairs = [(t.params["algorithm"], t.params["source"]) for t in trials[:6]]
    assert sorted(pairs) == sorted((a, s) for a in algorithms for s in sources)
    assert {a for a, _ in pairs[:3]} == set(algorithms)  # each algorithm first
    host = create_host()
    for t in trials[:6]:
        assert t.user_attrs["origin"] == "portfolio"
        for kind in ("algorithm", "source"):
            name = t.params[kind]
            defaults = host.get(kind, name).load().defaults()
            for key, value in t.params.items():
                if key.startswith(f"{name}."):
                    hp = key.split(".", 1)[1]
                    if (name, hp) != ("maml", "inner_lr"):
                        assert value == defaults[hp], (key, value)
    maml = next(t for t in trials[:6] if t.params["algorithm"] == "maml")
    assert 0.1 <= maml.params["maml.inner_lr"] <= 0.5  # sampled, not the default 0.01
    assert "origin" not in trials[6].user_attrs
    # A budget smaller than the pairs still tries every algorithm.
    caplog.set_level(logging.WARNING)
    autometa.search("digits", study_name="three", n_trials=3, **settings)
    few = optuna.load_study(study_name="three", storage=settings["storage"]).trials
    assert {t.params["algorithm"] for t in few} == set(algorithms)
    assert "only the first 3 of 6 initial configurations" in caplog.text


def test_the_quickstart_config_runs_every_algorithm_first(tmp_path: Path) -> None:
    from autometa.config import SearchConfig

    path = Path(__file__).resolve().parents[1] / "examples" / "quickstart.toml"
    config = SearchConfig.from_file(path)
    assert (config.initial, config.pruner) == ("portfolio", "hyperband")
    small = {k: v for k, v in config.to_dict().items() if k != "task"}
    small |= {"n_trials": 4, "meta_steps": 9, "eval_every": 3, "workers": 1, "top_k": 1,
              "task_params": {"val_episodes": 12, "test_episodes": 2, "eval_queries": 5},
              "storage": f"sqlite:///{tmp_path / 's.db'}", "artifacts": str(tmp_path / "a")}
    small["algorithm_params"] = {**small["algorithm_params"],
                                 "reptile": {"eval_steps": 5}}
    autometa.search(config.task, **small)
    trials = optuna.load_study(study_name="quickstart", storage=small["storage"]).trials
    assert {t.params["algorithm"] for t in trials} == set(config.algorithms)
