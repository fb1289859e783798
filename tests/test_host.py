"""The plugin host in-process: isolation of broken plugins, clashes, disabling, look-ups."""

from __future__ import annotations

import types
from importlib.metadata import version

import pytest

import autometa
from autometa import PluginError
from autometa.plugins import DISTRIBUTION


def plugin(**hooks: object) -> types.SimpleNamespace:
    """An in-process plugin object whose attributes are hook implementations."""
    return types.SimpleNamespace(**{k: autometa.hookimpl(v) for k, v in hooks.items()})


def tasks(*names: str) -> types.SimpleNamespace:
    def register_tasks(register):
        for name in names:
            register(name, "autometa_plugins.sinusoid.task:Sinusoid")

    return plugin(register_tasks=register_tasks)


def test_first_party_plugins_come_through_entry_points_with_versions() -> None:
    """sinusoid, mlp, maml and finetune are entry-point plugins of autometa's distribution."""
    host = autometa.create_host()
    expected = {"sinusoid": "task", "mlp": "source", "maml": "algorithm", "finetune": "algorithm"}
    for name, kind in expected.items():
        info = host.plugins[name]
        assert (info.status, info.distribution, info.version) == \
            ("ok", DISTRIBUTION, version(DISTRIBUTION))
        reg = host.get(kind, name)
        assert reg.plugin == name and reg.version == version(DISTRIBUTION)


def test_a_failing_registration_hook_is_isolated_and_keeps_nothing() -> None:
    """A hook that raises marks its plugin broken; its earlier registrations are dropped."""
    def register_tasks(register):
        register("half", "autometa_plugins.sinusoid.task:Sinusoid")
        raise RuntimeError("boom")

    host = autometa.create_host(entry_points=False, plugins={
        "bad": plugin(register_tasks=register_tasks), "good": tasks("fine")})
    assert host.plugins["bad"].status == "broken"
    assert "RuntimeError: boom" in (host.plugins["bad"].error or "")
    assert host.names("task") == ["fine"]
    with pytest.raises(PluginError, match="boom"):
        autometa.create_host(entry_points=False, strict=True,
                             plugins={"bad": plugin(register_tasks=register_tasks)})


def test_a_misspelled_hook_is_caught_with_the_closest_name() -> None:
    """A hook that matches no specification breaks its plugin only, with a suggestion."""
    def register_task(register):
        register("x", "m:a")

    host = autometa.create_host(entry_points=False, plugins={
        "typo": plugin(register_task=register_task), "good": tasks("fine")})
    assert host.plugins["typo"].status == "broken"
    assert (host.plugins["typo"].error or "").startswith(
        "invalid hooks: unknown hook 'register_task' (did you mean 'register_tasks'?)")
    assert host.names("task") == ["fine"] and host.plugins["good"].status == "ok"
    with pytest.raises(PluginError, match="did you mean 'register_tasks'"):
        autometa.create_host(entry_points=False, strict=True,
                             plugins={"typo": plugin(register_task=register_task)})


def test_a_hook_with_a_wrong_signature_is_caught() -> None:
    """An implementation asking for an argument the spec does not have is rejected."""
    def register_tasks(registrar):
        pass

    host = autometa.create_host(entry_points=False,
                                plugins={"sig": plugin(register_tasks=register_tasks)})
    assert host.plugins["sig"].status == "broken"
    assert "registrar" in (host.plugins["sig"].error or "")
    assert "\n" not in (host.plugins["sig"].error or "")  # pluggy's message is multi-line


def test_a_name_clash_names_both_plugins() -> None:
    """Two plugins registering one name: using it is an error naming both; strict fails early."""
    host = autometa.create_host(entry_points=False,
                                plugins={"first": tasks("twin"), "second": tasks("twin")})
    assert "twin" not in host.names("task")
    with pytest.raises(PluginError, match="'first'.*'second'"):
        host.get("task", "twin")
    assert len(host.clashes()) == 1 and "'first'" in host.clashes()[0]
    with pytest.raises(PluginError, match="'first'.*'second'"):
        autometa.create_host(entry_points=False, strict=True,
                             plugins={"first": tasks("twin"), "second": tasks("twin")})


def test_disabled_plugins_are_listed_and_provide_nothing(monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    """AUTOMETA_DISABLE_PLUGINS (or disabled=) blocks plugins by name."""
    monkeypatch.setenv("AUTOMETA_DISABLE_PLUGINS", "maml, finetune")
    host = autometa.create_host()
    assert host.plugins["maml"].status == "disabled"
    assert host.plugins["maml"].distribution == DISTRIBUTION
    assert "maml" not in host.names("algorithm") and "finetune" not in host.names("algorithm")
    host = autometa.create_host(disabled=["sinusoid"])
    assert "sinusoid" not in host.names("task") and "maml" in host.names("algorithm")


def test_unknown_names_list_the_available_ones_and_the_closest() -> None:
    """A misspelt plugin name gets the list and a suggestion."""
    host = autometa.create_host()
    with pytest.raises(PluginError, match=r"unknown meta-algorithm 'mamll' \(did you mean "
                                          r"'maml'\?\); available: .*finetune.*maml"):
        host.get("algorithm", "mamll")


def test_string_factories_are_imported_on_use_with_a_clear_error() -> None:
    """A "module:attr" that does not exist fails at load, naming the plugin and the path."""
    host = autometa.create_host(entry_points=False, plugins={"p": plugin(
        register_meta_algorithms=lambda register: register("ghost", "no_such_module:Algo"))})
    reg = host.get("algorithm", "ghost")
    with pytest.raises(PluginError, match="'p'.*no_such_module:Algo"):
        reg.load()


def test_lifecycle_hooks_see_the_search_and_their_errors_do_not_stop_it() -> None:
    """A reporter plugin receives search_started, trial_finished, search_finished."""
    seen: list[str] = []

    def trial_finished(study_name, trial):
        seen.append(f"trial {trial.number} {trial.state.name}")
        raise RuntimeError("a reporter bug must not stop the search")

    reporter = plugin(
        search_started=lambda study_name, config: seen.append(f"start {config.task}"),
        trial_finished=trial_finished,
        search_finished=lambda study_name, leaderboard: seen.append(
            f"end {len(leaderboard.frame)}"),
    )
    host = autometa.create_host(plugins={"reporter": reporter})
    board = autometa.search("sinusoid", algorithms=["maml"], sources=["mlp"], n_trials=2,
                            meta_steps=4, eval_every=2, host=host, pruner="none",
                            algorithm_params={"maml": {"inner_lr": 0.01}},  # never diverges
                            task_params={"val_episodes": 5, "test_episodes": 5,
                                         "eval_queries": 5})
    assert seen[0] == "start sinusoid"
    assert seen[1:3] == ["trial 0 COMPLETE", "trial 1 COMPLETE"]
    assert seen[3] == f"end {len(board.frame)}" == "end 2"
