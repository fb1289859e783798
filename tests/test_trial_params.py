"""Per-trial task settings (``Task.trial_params``): fixed or searched from ``task_params``,
drawn per trial as ``task.<name>``, given to the task before each trial meta-trains.

The test task ``noisy`` adds ``noise`` times Gaussian noise to its meta-train support
targets, and writes each value its ``sample()`` saw, by trial (the generator's seed is the
trial's), to ``seen.txt``: what the trials really ran with, in this process or a worker's.
It is installed as a distribution, so that a pool's spawned workers load it too.
"""

from __future__ import annotations

import re
import types
from collections import defaultdict
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import pytest
from conftest import Install

import autometa
import autometa_plugins.maml
import autometa_plugins.mlp
from autometa.cli import main
from autometa.engine.prepare import prepare
from autometa.errors import ConfigError
from autometa.plugins import create_host
from autometa.space import Float
from autometa.study.settings import stored_search
from autometa.study.trials import TrialPlan, trial_seed

TASK = '''
import torch

import autometa
from autometa import Episodes, Float
from autometa_plugins.sinusoid.task import Sinusoid


class Noisy(Sinusoid):
    trial_params = {"noise": Float(0.0, 1.0)}
    noise = 0.0

    def sample(self, n_tasks, generator):
        e = super().sample(n_tasks, generator)
        with open("seen.txt", "a") as f:
            f.write(f"{generator.initial_seed()} {self.noise!r}\\n")
        noise = torch.randn(e.support_y.shape, generator=generator, device=self.device)
        return Episodes(e.support_x, e.support_y + self.noise * noise, e.query_x, e.query_y)


class Plain(Noisy):
    """The same task without per-trial settings: its noise stays 0.0."""

    trial_params = {}


@autometa.hookimpl
def register_tasks(register):
    register("noisy", "noisy_task:Noisy")
    register("plain", "noisy_task:Plain")
'''

SMALL = {"val_episodes": 4, "test_episodes": 4, "eval_queries": 5}
TINY: dict[str, Any] = dict(algorithms=["maml"], sources=["mlp"], meta_steps=3, eval_every=3,
                            top_k=2, pruner="none", algorithm_params={"maml": {"inner_steps": 1}})
#: Columns that measure wall-clock time, which differs between two runs of one search.
CLOCK = ["fit_time_s", "adapt_ms"]


@pytest.fixture(autouse=True)
def noisy(install: Install) -> None:
    install("noisy-dist", {"noisy": "noisy_task"}, {"noisy_task": TASK})


def _search(task: str = "noisy", n_trials: int = 4, **settings: Any) -> autometa.Leaderboard:
    params = {**SMALL, **settings.pop("task_params", {})}
    return autometa.search(task, n_trials=n_trials, task_params=params,
                           **{**TINY, **settings})


def _trials(study: str = "noisy-seed0", storage: str = "sqlite:///autometa.db"
            ) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=study, storage=storage).trials


def _seen() -> dict[int, set[float]]:
    """{trial seed: the noise values sample() saw}."""
    out: dict[int, set[float]] = defaultdict(set)
    for line in Path("seen.txt").read_text().splitlines():
        seed, value = line.split()
        out[int(seed)].add(float(value))
    return out


def _ran_with(trials: list[optuna.trial.FrozenTrial]) -> dict[int, float]:
    """{trial number: its recorded noise}, checked against what its sample() saw."""
    seen = _seen()
    recorded = {t.number: TrialPlan.of(t).task_params["noise"] for t in trials}
    assert {n: seen[trial_seed(0, n)] for n in recorded} == \
        {n: {v} for n, v in recorded.items()}
    return recorded


def test_not_given_every_trial_runs_at_the_default_as_a_task_without_them(tmp_path):
    board = _search()
    assert set(_ran_with(_trials()).values()) == {0.0}
    plain = _search("plain", study_name="noisy-seed0", storage="sqlite:///plain.db",
                    artifacts="plain-artifacts")
    assert "task.noise" not in board.frame.columns
    pd.testing.assert_frame_equal(board.frame.drop(columns=CLOCK),
                                  plain.frame.drop(columns=CLOCK))


def test_a_range_is_searched_recorded_and_run_and_the_stored_space_round_trips(tmp_path):
    board = _search(task_params={"noise": {"low": 0.0, "high": 0.5}})
    trials = _trials()
    ran = _ran_with(trials)
    assert ran[0] == 0.0  # the portfolio's trial: the default
    assert len(set(ran.values())) == 4 and all(0.0 <= v <= 0.5 for v in ran.values())
    assert {t.number: t.params["task.noise"] for t in trials} == ran
    assert dict(zip(board.frame["trial"], board.frame["task.noise"], strict=True)) == ran
    for trial, text in zip(board.frame["trial"], board.frame["params"], strict=True):
        assert text.endswith(f" | task: noise={ran[trial]:.4g}") == (ran[trial] != 0.0)

    # A process joining the study (another machine's worker) reads the same space back.
    config, _, _ = stored_search("noisy-seed0", "sqlite:///autometa.db")
    assert config.task_params == {**SMALL, "noise": {"low": 0.0, "high": 0.5}}
    assert prepare(config, create_host()).task_space == {"noise": Float(0.0, 0.5)}
    # A resume samples the stored space; another space is refused, nothing added.
    _search(n_trials=5, task_params={"noise": {"low": 0.0, "high": 0.5}})
    assert 0.0 <= _ran_with(_trials())[4] <= 0.5
    with pytest.raises(ConfigError, match=r"other settings \(task_params: .*'high': 0\.4"):
        _search(n_trials=6, task_params={"noise": {"low": 0.0, "high": 0.4}})
    assert len(_trials()) == 5

    # A model handed back configures a freshly built task with its trial's own value.
    rank = next(r for r, t in enumerate(board.frame["trial"], 1) if ran[t] != 0.0)
    model = autometa.load_model("noisy-seed0", rank=rank)
    assert model.task.noise == ran[model.trial] != type(model.task).noise


def test_a_fixed_value_runs_every_trial_and_is_named_in_params(tmp_path):
    board = _search(n_trials=3, task_params={"noise": 0.3})
    assert set(_ran_with(_trials()).values()) == {0.3}
    assert all("task.noise" not in t.params for t in _trials())  # not sampled
    assert "task.noise" not in board.frame.columns
    assert all(text.endswith(" | task: noise=0.3") for text in board.frame["params"])


def test_the_cli_takes_lists_and_ranges_as_for_algorithm_params(tmp_path):
    argv = ["run", "--task", "noisy", "--algorithms", "maml", "--sources", "mlp",
            "--trials", "3", "--meta-steps", "2", "--eval-every", "2", "--top-k", "1",
            "--pruner", "none", "--param", "maml.inner_steps=1", "--no-progress",
            *(a for k, v in SMALL.items() for a in ("--task-param", f"{k}={v}"))]
    assert main([*argv, "--task-param", "noise=[0.1,0.2]", "--study", "choices"]) == 0
    assert set(_ran_with(_trials("choices")).values()) <= {0.1, 0.2}
    Path("seen.txt").unlink()  # the next study's trials have the same seeds
    assert main([*argv, "--task-param", "noise={low=0.6,high=0.7}", "--study", "range"]) == 0
    ran = _ran_with(_trials("range"))
    assert all(0.6 <= v <= 0.7 for v in ran.values())  # the default 0.0 is outside: sampled


@pytest.mark.parametrize(("value", "says"), [
    ("2", r"task_params\.noise: 2\.0 is outside \[0\.0, 1\.0\]"),
    ("[x]", r"task_params\.noise: expected a finite number, got 'x'"),
    ("{low=0.5,high=2}", r"task_params\.noise: range \[0\.5, 2\.0\] is not inside"),
])
def test_a_bad_value_is_one_line_and_exit_2_with_nothing_stored(tmp_path, capsys, value, says):
    code = main(["run", "--task", "noisy", "--trials", "1", "--no-progress",
                 "--task-param", f"noise={value}"])
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith("autometa: error: ")
    assert re.search(says, err), err
    assert not Path("autometa.db").exists() and not Path("seen.txt").exists()


def test_an_unknown_name_lists_constructor_and_per_trial_parameters(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown parameter of task 'noisy' 'noize' \(did "
                                          r"you mean 'noise'\?\); available: .*noise.*shots"):
        _search(task_params={"noize": 0.1})
    assert not Path("autometa.db").exists()


@pytest.mark.slow  # two worker processes
def test_two_workers_give_each_trial_its_own_value(tmp_path):
    _search(workers=2, task_params={"noise": {"low": 0.0, "high": 1.0}})
    trials = _trials()
    assert {t.user_attrs["worker"]["worker"] for t in trials} == {0, 1}
    ran = _ran_with(trials)  # seen.txt was written by the workers' processes
    assert len(set(ran.values())) == 4
    assert {t.number: t.params["task.noise"] for t in trials} == ran


def test_autometa_plugins_lists_them_with_their_defaults(capsys):
    assert main(["plugins", "--verbose"]) == 0
    out = capsys.readouterr().out
    assert "noise in [0.0, 1.0]: per trial, fixed or searched as an algorithm's, default 0.0" \
        in out


def test_the_kit_checks_defaults_and_that_meta_val_does_not_depend_on_them():
    import noisy_task  # type: ignore[import-not-found]

    from autometa.testing import check_task

    check_task(noisy_task.Noisy, **SMALL)

    class Leaky(noisy_task.Noisy):
        def meta_val(self):
            e = super().meta_val()
            return autometa.Episodes(e.support_x, e.support_y + self.noise, e.query_x,
                                     e.query_y)

    with pytest.raises(AssertionError, match=r"meta_val\(\) changes with the trial_params "
                                             r"\{'noise': 1\.0\}: they may change meta-train"):
        check_task(Leaky, **SMALL)

    class Undefaulted(noisy_task.Noisy):
        trial_params = {"noise": Float(0.0, 1.0), "flip": Float(0.0, 1.0)}

    with pytest.raises(AssertionError, match="declares 'flip' without a default"):
        check_task(Undefaulted, **SMALL)


def test_a_resume_refuses_a_task_that_no_longer_declares_a_stored_setting(tmp_path):
    import noisy_task  # type: ignore[import-not-found]

    def host(cls: type) -> Any:
        @autometa.hookimpl
        def register_tasks(register: Any) -> None:
            register("noisy", cls)

        return create_host(entry_points=False, plugins={
            "maml": autometa_plugins.maml, "mlp": autometa_plugins.mlp,
            "tasks": types.SimpleNamespace(register_tasks=register_tasks)})

    _search(n_trials=1, host=host(noisy_task.Noisy))
    with pytest.raises(ConfigError, match=r"study 'noisy-seed0' drew the task's 'noise' per "
                                          r"trial, which task 'noisy' no longer declares"):
        _search(n_trials=2, host=host(noisy_task.Plain))
    assert len(_trials()) == 1


def test_params_text_names_only_what_a_trial_set() -> None:
    """A baseline on raw inputs (a source without settings) ends at its own settings: no
    dangling " |" (the fresh user saw "C=1 normalize=True |  | bf16")."""
    from autometa.study.trials import TrialPlan

    raw = TrialPlan("linear-probe", "raw", {"C": 1, "normalize": True})
    assert raw.params_text() == "C=1 normalize=True"
    bf16 = TrialPlan("linear-probe", "raw", {"C": 1, "normalize": True}, precision="bf16")
    assert bf16.params_text() == "C=1 normalize=True | bf16"
    searched = TrialPlan("maml", "mlp", {"inner_lr": 0.01}, {"hidden": 40}, {"flip": True})
    assert searched.params_text({}) == "inner_lr=0.01 | hidden=40 | task: flip=True"
    assert TrialPlan("protonet", "mlp", {}, {"hidden": 40}).params_text() == " | hidden=40"
