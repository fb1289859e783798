"""Time as a trial's budget: ``trial_timeout`` (seconds of meta-training per trial) stops
meta-training and scores the trial on what it has; Hyperband counts seconds with
``pruner_resource = "seconds"``; studies stored before these settings existed resume.

Real small sinusoid searches; the budgets in steps are far beyond what a trial runs in its
seconds, so the time limit is what ends each trial.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna
import pytest
from conftest import SMALL_SINUSOID
from optuna.trial import TrialState

import autometa
from autometa.cli import main
from autometa.errors import ConfigError
from autometa.study.settings import CONFIG_ATTR, stored_search

#: A budget in meta-steps no trial reaches within its seconds here.
UNREACHABLE = 100_000
CUT_NOTE = "stopped meta-training at trial_timeout"


def trials_of(study: str, storage: str) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=study, storage=storage).get_trials()


def test_a_trial_timeout_stops_meta_training_and_scores_what_it_has(tmp_path: Path,
                                                                     capsys) -> None:
    storage = f"sqlite:///{tmp_path / 's.db'}"
    code = main(["run", "--task", "sinusoid", "--algorithms", "maml", "--sources", "mlp",
                 "--trials", "2", "--meta-steps", str(UNREACHABLE), "--eval-every", "40",
                 "--trial-timeout", "1", "--pruner", "none", "--initial", "none",
                 "--no-baselines", "--study", "cut", "--storage", storage,
                 "--artifacts", str(tmp_path / "art"), "--out", str(tmp_path / "out"),
                 "--threads", "1", "--no-progress", "--param", "maml.inner_lr=0.05",
                 "--param", "maml.inner_steps=1", "--param", "maml.meta_lr={low=0.001,high=0.01}",
                 *(f"--task-param={k}={v}" for k, v in SMALL_SINUSOID.items())])
    out = capsys.readouterr().out
    assert code == 0
    trials = trials_of("cut", storage)
    assert len(trials) == 2
    for t in trials:
        attrs = t.user_attrs
        assert t.state == TrialState.COMPLETE and not attrs.get("pruned")
        # Stopped at the time limit, far short of its steps, and says where.
        steps = attrs["meta_steps"]
        assert 0 < steps < UNREACHABLE
        assert attrs["stopped_at_timeout"]["step"] == steps
        assert attrs["stopped_at_timeout"]["seconds"] >= 1 and attrs["fit_time_s"] >= 1
        # Its final evaluation ran on the model as it was (the last reported step), with
        # the per-episode scores a finished trial records; and it was scored on meta-test.
        assert max(t.intermediate_values) == steps
        assert t.value == pytest.approx(t.intermediate_values[steps])
        assert len(attrs["val_scores"]) == SMALL_SINUSOID["val_episodes"]
        assert attrs["test_n"] == SMALL_SINUSOID["test_episodes"]
        assert attrs["test_mean"] == attrs["test_mean"]  # a number, not NaN
        assert f"trial {t.number}: mse " in out
        assert f"(stopped at trial_timeout after {steps:,} meta-steps)" in out
    # The leaderboard lists them, with a note naming each one.
    board = (tmp_path / "out" / "cut.md").read_text()
    assert CUT_NOTE in out and CUT_NOTE in board
    for t in trials:
        assert f"| {t.number} | maml |" in board
        assert f"trial {t.number} after {t.user_attrs['meta_steps']:,} meta-steps" in board
    # Stored with the study's settings: a worker joining it gets the same limit.
    config, _, _ = stored_search("cut", storage)
    assert config.trial_timeout == 1


#: Seconds of meta-training per trial under Hyperband on seconds: one bracket, its first
#: rung at 1 s (engine.sampling.seconds_budget).
TRIAL_TIMEOUT = 2
#: A MAML that learns within a second of meta-training, and a Meta-SGD that cannot (its
#: smallest meta- and inner step sizes): Hyperband's first rung tells them apart.
LEARNS = {"meta_lr": 0.01, "inner_lr": 0.05, "inner_steps": 1, "meta_batch_size": 10,
          "first_order": False}
STALLS = {"meta_lr": 1e-4, "init_inner_lr": 0.005, "inner_steps": 1, "meta_batch_size": 4}


def test_hyperband_on_seconds_prunes_at_whole_seconds_and_completes_what_it_pruned(
        tmp_path: Path) -> None:
    settings: dict[str, Any] = {
        "algorithms": ["maml", "metasgd"], "sources": ["mlp"],
        "algorithm_params": {"maml": LEARNS, "metasgd": STALLS},
        "source_params": {"mlp": {"hidden": 40, "layers": 2}},
        "meta_steps": UNREACHABLE, "eval_every": 20, "top_k": 1, "initial": "none",
        "baselines": False, "pruner": "hyperband", "pruner_resource": "seconds",
        "trial_timeout": TRIAL_TIMEOUT, "threads": 1, "study_name": "hb",
        "storage": f"sqlite:///{tmp_path / 's.db'}", "artifacts": str(tmp_path / "art"),
        "task_params": {"val_episodes": 20, "test_episodes": 5, "eval_queries": 20},
    }
    # The study made with its deadline already passed (no trial runs), then a scripted
    # order queued as an Optuna user would: MAML first, then Meta-SGD twice.
    autometa.search("sinusoid", n_trials=3, timeout=1e-3, **settings)
    study = optuna.load_study(study_name="hb", storage=settings["storage"])
    for algorithm in ("maml", "metasgd", "metasgd"):
        study.enqueue_trial({"algorithm": algorithm})
    board = autometa.search("sinusoid", n_trials=3, **settings)
    trials = study.get_trials()
    shown = [(t.number, t.state.name, t.params, t.intermediate_values) for t in trials]

    # Meta-SGD was pruned at the first rung, 1 s of meta-training, before its time limit.
    maml, *pruned, completion = trials
    assert [t.state for t in pruned] == [TrialState.PRUNED] * 2, shown
    for t in pruned:
        assert t.params["algorithm"] == "metasgd" and t.last_step == 1
        assert "stopped_at_timeout" not in t.user_attrs
    # Reported at whole seconds of meta-training, never past the time limit; the learning
    # curve is kept in meta-steps beside them.
    for t in trials:
        assert all(isinstance(s, int) and 0 <= s <= TRIAL_TIMEOUT
                   for s in t.intermediate_values), shown
        curve = t.user_attrs["val_curve"]
        assert [s for s, _ in curve[:-1]] == [20 * (i + 1) for i in range(len(curve) - 1)]
        assert curve[-1][0] == t.user_attrs["meta_steps"]
    # Every Meta-SGD trial pruned: its furthest configuration ran again in full, to the
    # time limit, without pruning (it is worse at 1 s), as on meta-steps.
    assert completion.user_attrs.get("completion") and completion.params["algorithm"] == \
        "metasgd"
    for t in (maml, completion):
        assert t.state == TrialState.COMPLETE and not t.user_attrs.get("pruned")
        assert t.user_attrs["stopped_at_timeout"]["step"] == t.user_attrs["meta_steps"]
        assert len(t.user_attrs["val_scores"]) == 20
    assert list(board.frame["trial"]) == [maml.number, completion.number]
    assert board.counts == {"complete": 2, "pruned": 2, "failed": 0, "interrupted": 0,
                            "running": 0}


def test_the_wilcoxon_pruners_paired_final_score_runs_on_a_trial_cut_short(tmp_path):
    storage = f"sqlite:///{tmp_path / 's.db'}"
    autometa.search("sinusoid", algorithms=["maml"], sources=["mlp"], n_trials=1,
                    meta_steps=UNREACHABLE, eval_every=40, trial_timeout=1,
                    pruner="wilcoxon", initial="none", baselines=False, threads=1,
                    algorithm_params={"maml": {"inner_lr": 0.05, "inner_steps": 1}},
                    study_name="w", storage=storage, artifacts=str(tmp_path / "art"),
                    task_params=SMALL_SINUSOID)
    (t,) = trials_of("w", storage)
    steps = t.user_attrs["meta_steps"]
    assert t.state == TrialState.COMPLETE and steps < UNREACHABLE
    assert t.user_attrs["stopped_at_timeout"]["step"] == steps
    # The final evaluation was the paired one: every meta-val episode reported by index.
    assert sorted(t.intermediate_values) == list(range(SMALL_SINUSOID["val_episodes"]))
    assert t.user_attrs["val_curve"][-1][0] == steps


def test_a_study_stored_before_trial_timeout_existed_resumes(tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path / 's.db'}"
    settings: dict[str, Any] = {
        "algorithms": ["maml"], "sources": ["mlp"], "meta_steps": 2, "eval_every": 2,
        "initial": "none", "baselines": False, "threads": 1, "study_name": "old",
        "storage": storage, "artifacts": str(tmp_path / "art"),
        "task_params": {"val_episodes": 5, "test_episodes": 5},
    }
    autometa.search("sinusoid", n_trials=1, **settings)
    # As an earlier autometa stored it: neither setting in its settings or fingerprint.
    study = optuna.load_study(study_name="old", storage=storage)
    stored = dict(study.user_attrs[CONFIG_ATTR])
    for part in ("config", "fingerprint"):
        stored[part] = {k: v for k, v in stored[part].items()
                        if k not in ("trial_timeout", "pruner_resource")}
    study.set_user_attr(CONFIG_ATTR, stored)

    board = autometa.search("sinusoid", n_trials=2, **settings)
    assert board.counts["complete"] == 2
    config, _, _ = stored_search("old", storage)  # how a worker elsewhere reads it
    assert (config.trial_timeout, config.pruner_resource) == (None, "meta_steps")
    # It ran without a time limit: a resume that sets one is another search.
    with pytest.raises(ConfigError, match=r"trial_timeout: None -> 5"):
        autometa.search("sinusoid", n_trials=3, trial_timeout=5, **settings)
    assert len(trials_of("old", storage)) == 2
