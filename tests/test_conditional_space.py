"""Conditional hyperparameters (autometa.space's ``when=``): LoRA's settings are searched
only where a search fixes ``adapter = "lora"``; a default search neither samples them nor
needs peft."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import optuna
import pytest

import autometa
from autometa import Categorical, ConfigError, Float, Int
from autometa.space import describe, from_json, restrict, to_json

SPACE = {"lr": Float(0.001, 0.1, log=True),
         "rank": Int(2, 32, log=True, when=("adapter", "lora")),
         "targets": Categorical(("attention", "linear"), when=("adapter", "lora"))}
SETTABLE = {"adapter": str}
DEFAULTS = {"adapter": "none", "lr": 0.01, "rank": 8, "targets": "attention"}


def test_inactive_parameters_are_dropped_and_active_ones_kept_without_their_condition() -> None:
    assert restrict("algo", SPACE, {}, SETTABLE, DEFAULTS) == {"lr": SPACE["lr"]}
    active = restrict("algo", SPACE, {"adapter": "lora", "rank": {"high": 16}}, SETTABLE,
                      DEFAULTS)
    assert active == {"lr": SPACE["lr"], "rank": Int(2, 16, True),
                      "targets": Categorical(("attention", "linear")), "adapter": "lora"}
    # What a study stores has no condition left: the same JSON as before conditions.
    assert to_json(active)["targets"] == {"type": "categorical",
                                          "choices": ["attention", "linear"]}
    # The default decides where the user fixed nothing.
    assert "rank" in restrict("algo", SPACE, {}, SETTABLE, {**DEFAULTS, "adapter": "lora"})


def test_setting_an_inactive_parameter_is_refused_with_the_fix() -> None:
    with pytest.raises(ConfigError) as info:
        restrict("maml", SPACE, {"rank": 4}, SETTABLE, DEFAULTS)
    assert str(info.value) == ("maml.rank applies only when maml.adapter is 'lora' (it is "
                               "'none'); set maml.adapter=lora, or drop maml.rank")


def test_a_condition_on_a_searched_hyperparameter_is_refused() -> None:
    space = {**SPACE, "adapter": Categorical(("none", "lora"))}
    with pytest.raises(ConfigError, match=r"maml.adapter is itself searched; fix it, e.g. "
                                          r"maml.adapter=lora"):
        restrict("maml", space, {}, {}, DEFAULTS)


def test_listings_show_the_condition_and_json_keeps_it() -> None:
    assert describe(SPACE) == ("lr in [0.001, 0.1] log; rank in [2, 32] log when "
                               "adapter='lora'; targets in {'attention', 'linear'} when "
                               "adapter='lora'")
    assert from_json(to_json(SPACE)) == SPACE


# --- at the level users see: a search's stored trials -------------------------------------------

TINY: dict[str, Any] = {
    "algorithms": ["maml"], "sources": ["mlp"], "meta_steps": 2, "eval_every": 2,
    "top_k": 1, "seed": 0, "pruner": "none", "initial": "none",
    "task_params": {"val_episodes": 4, "test_episodes": 4, "eval_queries": 5},
    "source_params": {"mlp": {"hidden": 40, "layers": 1}},
}


def _trials(tmp_path: Path, maml: dict[str, Any], n_trials: int = 2
            ) -> list[optuna.trial.FrozenTrial]:
    storage = f"sqlite:///{tmp_path / 's.db'}"
    autometa.search("sinusoid", n_trials=n_trials, storage=storage, study_name="s",
                    artifacts=str(tmp_path / "art"),
                    algorithm_params={"maml": {"meta_batch_size": 4, "inner_steps": 1,
                                               **maml}}, **TINY)
    return optuna.load_study(study_name="s", storage=storage).get_trials()


def test_a_default_search_samples_no_lora_setting(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "peft", None)  # as if not installed: not needed
    trials = _trials(tmp_path, {})
    assert trials and all(t.state.name == "COMPLETE" for t in trials)
    for t in trials:
        assert not [k for k in t.params if "lora" in k], t.params


def test_adapter_lora_searches_rank_and_alpha(tmp_path: Path) -> None:
    # An MLP has no attention: targets are fixed to every Linear layer.
    trials = _trials(tmp_path, {"adapter": "lora", "lora_targets": "linear"})
    assert all(t.state.name == "COMPLETE" for t in trials), [t.state for t in trials]
    for t in trials:
        assert {"maml.lora_rank", "maml.lora_alpha"} <= set(t.params), t.params
        assert 2 <= t.params["maml.lora_rank"] <= 32
        assert "maml.lora_targets" not in t.params  # fixed, not searched


def test_a_lora_setting_without_the_adapter_is_one_line_with_the_fix(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        _trials(tmp_path, {"lora_rank": 4})
    assert str(info.value) == ("maml.lora_rank applies only when maml.adapter is 'lora' (it "
                               "is 'none'); set maml.adapter=lora, or drop maml.lora_rank")
    assert not (tmp_path / "s.db").exists() or not optuna.get_all_study_names(
        f"sqlite:///{tmp_path / 's.db'}")


def test_the_kit_catches_a_condition_on_no_setting() -> None:
    from autometa.testing import check_space
    from autometa_plugins.maml.algorithm import MAML

    class Misspelled(MAML):
        @classmethod
        def search_space(cls) -> dict[str, Any]:
            return {"lora_rank": Int(2, 32, log=True, when=("adaptor", "lora"))}

    with pytest.raises(AssertionError, match=r"lora_rank: its condition names 'adaptor', "
                                             r"which is no keyword of __init__"):
        check_space(Misspelled, Misspelled.search_space())
    check_space(MAML, MAML.search_space())  # the first-party spaces pass
