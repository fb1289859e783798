"""Typed settings at the edge, a trial that raises, and resuming after a plugin is installed."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import optuna
import pytest
import torch
from limits import QUICK_SUBPROCESS

import autometa
import autometa_plugins.maml
import autometa_plugins.mlp
import autometa_plugins.sinusoid
from autometa import ConfigError, MetaAlgorithm, create_host
from autometa.cli import main
from autometa.params import CliText, parse
from autometa_plugins.maml.algorithm import MAML

SMALL = {"val_episodes": 4, "test_episodes": 4, "eval_queries": 5}
TINY = dict(task_params=SMALL, meta_steps=2, eval_every=2, top_k=1)


@pytest.mark.parametrize("text, expected", [
    ("true", True), ("False", False), ("YES", True), ("no", False), ("1", True), ("0", False),
])
def test_command_line_booleans_accept_the_documented_spellings(text, expected):
    assert parse("x.flag", bool, CliText(text)) is expected


@pytest.mark.parametrize("value", ["False", "no", "off", 0, 1, None, "true"])
def test_a_bool_from_python_or_a_file_must_be_a_bool(value):
    with pytest.raises(ConfigError, match=r"^x\.flag: expected true or false, got "):
        parse("x.flag", bool, value)


@pytest.mark.parametrize("declared, text, expected", [
    (int, "7", 7), (float, "1e-3", 1e-3), (float, "2", 2.0), (str, "a b", "a b"),
    (int | None, "3", 3), (Literal["auto", "loop"], "loop", "loop"),
    (str | os.PathLike[str] | None, "123", "123"),
])
def test_command_line_text_is_parsed_as_the_declared_type(declared, text, expected):
    value = parse("x.y", declared, CliText(text))
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize("declared, value, says", [
    (float, CliText("nan"), "a finite number"), (float, float("inf"), "a finite number"),
    (int, CliText("1.5"), "an integer"), (int, True, "an integer"),
    (str, "a\x00b", "text"), (Literal["auto", "loop"], "bogus", "one of 'auto', 'loop'"),
])
def test_values_that_do_not_fit_name_the_setting_and_the_type(declared, value, says):
    with pytest.raises(ConfigError, match=f"^x.y: expected {says}, got "):
        parse("x.y", declared, value)


def _host(*extra: tuple[str, object]):
    return create_host(entry_points=False, plugins={
        "maml": autometa_plugins.maml, "mlp": autometa_plugins.mlp,
        "sinusoid": autometa_plugins.sinusoid, **dict(extra)})


def test_the_cli_and_python_store_the_same_typed_settings(tmp_path):
    """`--param maml.inner_steps=1` (text) and inner_steps=1 (Python) are one study: the
    CLI's run resumes the Python one instead of being refused as other settings."""
    storage = f"sqlite:///{tmp_path / 'a.db'}"
    autometa.search("sinusoid", algorithms=["maml"], sources=["mlp"], n_trials=1, seed=1,
                    algorithm_params={"maml": {"inner_steps": 1, "first_order": True}},
                    storage=storage, artifacts=str(tmp_path / "art"), **TINY)
    argv = ["run", "--task", "sinusoid", "--algorithms", "maml", "--sources", "mlp",
            "--trials", "2", "--seed", "1", "--meta-steps", "2", "--eval-every", "2",
            "--top-k", "1", "--storage", storage, "--artifacts", str(tmp_path / "art"),
            "--out", str(tmp_path / "rep"), "--no-progress",
            "--param", "maml.inner_steps=1", "--param", "maml.first_order=yes",
            *(a for k, v in SMALL.items() for a in ("--task-param", f"{k}={v}"))]
    assert main(argv) == 0
    study = optuna.load_study(study_name="sinusoid-seed1", storage=storage)
    assert len(study.trials) == 2
    assert {t.user_attrs["algorithm_params"]["inner_steps"] for t in study.trials} == {1}
    assert {t.user_attrs["algorithm_params"]["first_order"] for t in study.trials} == {True}


class Fragile(MAML):
    """MAML whose trials raise when the inner step size is large (a plugin bug)."""

    def meta_step(self, batch):
        if self.inner_lr > 0.05:
            raise IndexError("index 7 is out of bounds for dimension 0 with size 5")
        return super().meta_step(batch)


class _FragilePlugin:
    @staticmethod
    @autometa.hookimpl
    def register_meta_algorithms(register):
        register("fragile", Fragile)


def test_a_trial_that_raises_fails_alone_and_the_search_goes_on(tmp_path):
    board = autometa.search(
        "sinusoid", host=_host(("fragile", _FragilePlugin())), algorithms=["fragile"],
        sources=["mlp"], n_trials=4, seed=0, pruner="none",
        algorithm_params={"fragile": {"inner_lr": [0.01, 0.1], "meta_batch_size": 4}},
        storage=f"sqlite:///{tmp_path / 'a.db'}", artifacts=str(tmp_path / "art"), **TINY)
    study = optuna.load_study(study_name="sinusoid-seed0", storage=f"sqlite:///{tmp_path}/a.db")
    failed = [t for t in study.trials if t.state == optuna.trial.TrialState.FAIL]
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(study.trials) == 4 and failed and complete
    for t in failed:
        assert t.params["fragile.inner_lr"] == 0.1
        assert t.user_attrs["failure"] == ("IndexError: index 7 is out of bounds for "
                                           "dimension 0 with size 5")
    assert board.counts["failed"] == len(failed) and len(board.frame) == len(complete)


class Late(MetaAlgorithm):
    """An algorithm 'installed' after a study began."""

    def __init__(self, model, task, *, lr: float = 0.1) -> None:
        super().__init__(model, task)

    @classmethod
    def search_space(cls):
        return {"lr": autometa.Float(0.01, 1.0)}

    def meta_step(self, batch):
        return 0.0

    def adapt_and_predict(self, episodes):
        return torch.zeros(*episodes.query_y.shape)


class _LatePlugin:
    @staticmethod
    @autometa.hookimpl
    def register_meta_algorithms(register):
        register("late", Late)


def test_installing_a_plugin_does_not_change_a_resumed_study(tmp_path):
    """A study that searched "every compatible algorithm" resumes with the algorithms and
    spaces it began with; without that, Optuna refuses the grown categorical (and each
    attempt stored another failed trial)."""
    common = dict(sources=["mlp"], seed=0, storage=f"sqlite:///{tmp_path / 'a.db'}",
                  artifacts=str(tmp_path / "art"), **TINY,
                  algorithm_params={"maml": {"inner_lr": 0.01}})  # never diverges
    autometa.search("sinusoid", host=_host(), n_trials=1, **common)
    board = autometa.search("sinusoid", host=_host(("late", _LatePlugin())), n_trials=3,
                            **common)
    assert board.counts == {"complete": 3, "pruned": 0, "failed": 0, "interrupted": 0,
                            "running": 0}
    assert set(board.frame["algorithm"]) == {"maml"}


def test_resuming_without_a_plugin_the_study_searched_is_one_clear_error(tmp_path):
    common = dict(sources=["mlp"], seed=0, storage=f"sqlite:///{tmp_path / 'a.db'}",
                  artifacts=str(tmp_path / "art"), **TINY)
    autometa.search("sinusoid", host=_host(("late", _LatePlugin())), n_trials=1, **common)
    before = (tmp_path / "a.db").read_bytes()
    with pytest.raises(ConfigError, match="searched algorithm 'late', which is not usable"):
        autometa.search("sinusoid", host=_host(), n_trials=2, **common)
    assert (tmp_path / "a.db").read_bytes() == before


def test_read_only_commands_create_no_storage(tmp_path: Path, capsys):
    assert main(["leaderboard", "nosuch"]) == 2
    assert "no database" in capsys.readouterr().err
    assert not (tmp_path / "autometa.db").exists()


class Raises(Late):
    """An algorithm whose own code raises when the engine asks about it."""

    @classmethod
    def search_space(cls):
        raise RuntimeError("boom\nsecond line")


class _RaisesPlugin:
    @staticmethod
    @autometa.hookimpl
    def register_meta_algorithms(register):
        register("raises", Raises)


def test_a_plugin_whose_search_space_raises_is_left_out_of_a_default_search(tmp_path):
    host = _host(("raises", _RaisesPlugin()))
    board = autometa.search("sinusoid", host=host, sources=["mlp"], n_trials=1,
                            storage=f"sqlite:///{tmp_path / 'a.db'}",
                            artifacts=str(tmp_path / "art"), **TINY)
    assert list(board.frame["algorithm"]) == ["maml"]
    with pytest.raises(autometa.PluginError, match="raised in search_space..: RuntimeError: "
                                                   "boom second line$"):
        autometa.search("sinusoid", host=host, algorithms=["raises"], sources=["mlp"],
                        n_trials=1, storage=f"sqlite:///{tmp_path / 'b.db'}", **TINY)
    assert not (tmp_path / "b.db").exists()


@pytest.mark.parametrize("content", [b"", b"not a torch file", b"\x80\x02c__builtin__\neval\n"])
def test_a_damaged_trial_state_is_one_line_without_torchs_advice(tmp_path, capsys, content):
    autometa.search("sinusoid", host=_host(), sources=["mlp"], n_trials=1, top_k=1,
                    storage=f"sqlite:///{tmp_path / 'a.db'}", artifacts=str(tmp_path / "art"),
                    task_params=SMALL, meta_steps=2, eval_every=2, seed=0)
    state, = (tmp_path / "art").iterdir()  # Optuna's artifact, by its id
    state.write_bytes(content)
    # Its worker scored it on meta-test: handing the model back is what reads the state.
    code = main(["export", "sinusoid-seed0", "--storage", f"sqlite:///{tmp_path}/a.db",
                 "--out", str(tmp_path / "export")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "trial 0's state in" in err[0]
    assert "weights_only" not in err[0] and "corrupt" in err[0]


def test_a_retried_trial_does_not_keep_its_failed_trials_test_score(tmp_path):
    """A trial whose process died after its meta-test scoring but before it was told: its
    retry inherits the failed trial's attributes (Optuna copies them), but lists its own
    meta-test score, never the dead trial's."""
    import subprocess
    import sys

    url = f"sqlite:///{tmp_path / 'a.db'}"
    autometa.search("sinusoid", sources=["mlp"], algorithms=["maml"], n_trials=1,
                    storage=url, artifacts=str(tmp_path / "art"), seed=0, **TINY)
    study = optuna.load_study(study_name="sinusoid-seed0", storage=url)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True,
                          timeout=QUICK_SUBPROCESS)
    lost = study.ask({"algorithm": optuna.distributions.CategoricalDistribution(["maml"])})
    first = study.trials[0].user_attrs
    for key in ("algorithm", "source", "algorithm_params", "source_params"):
        lost.set_user_attr(key, first[key])
    lost.set_user_attr("worker", {"host": os.uname().nodename, "pid": int(dead.stdout)})
    for key, value in {"test_mean": 123.0, "test_ci95": 1.0, "test_n": 4,
                       "test_ci_over": "episodes", "test_scores": [123.0] * 4,
                       "fit_time_s": 999.0}.items():
        lost.set_user_attr(key, value)
    # The resume fails the lost trial (its process is gone) and runs it again.
    autometa.search("sinusoid", sources=["mlp"], algorithms=["maml"], n_trials=2,
                    storage=url, artifacts=str(tmp_path / "art"), seed=0, **TINY)
    board = autometa.load_leaderboard("sinusoid-seed0", url, top_k=2)
    retry, = (t for t in optuna.load_study(study_name="sinusoid-seed0", storage=url).trials
              if t.system_attrs.get("failed_trial") == lost.number)
    row = board.frame.set_index("trial").loc[retry.number]
    assert row["test_n"] == 4 and row["test_mse"] != 123.0
    assert row["fit_time_s"] != 999.0
