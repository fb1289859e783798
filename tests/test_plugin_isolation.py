"""Plugins never take the host down: real installed distributions (dist-info directories on
sys.path, found by importlib.metadata) that share a name, exit at import, misspell a hook
or raise in their classes; `autometa plugins` lists each and exits 0."""

from __future__ import annotations

import sys
import types

import pytest
from conftest import Install

import autometa
from autometa import PluginError
from autometa.cli import main
from autometa.events import SearchStarted
from autometa_plugins.mlp.model import MLP

#: Module of a second distribution's `mlp` plugin (a name autometa's own plugin has).
FAKE_MLP = """
    import autometa

    class FakeMLP:
        @classmethod
        def search_space(cls):
            return {}

    @autometa.hookimpl
    def register_source_models(register):
        register("mlp", FakeMLP, description="another distribution's mlp")
        register("fancy", FakeMLP)
"""
#: Module of a plugin whose entries fail only when used.
FAILING_ENTRIES = """
    import autometa

    class BadSpace:
        @classmethod
        def search_space(cls):
            raise ValueError("no space\\non two lines")

    @autometa.hookimpl
    def register_meta_algorithms(register):
        register("bad-space", BadSpace)
        register("exits-on-load", "exit_on_import:Algo")
"""


def tables(out: str) -> list[list[list[str]]]:
    """The rich tables printed in ``out``: rows of cells, folded lines joined back."""
    found: list[list[list[str]]] = []
    for line in out.splitlines():
        if line.startswith("┏"):
            found.append([])
        elif line.startswith("│") and found:
            cells = [c.strip() for c in line.strip("│").split("│")]
            if cells[0] or not found[-1]:
                found[-1].append(cells)
            else:  # a continuation of the row above
                found[-1][-1] = [f"{a} {b}".strip() for a, b in zip(found[-1][-1], cells,
                                                                     strict=True)]
    return found


def listing(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[str, list[list[list[str]]]]:
    """Run `autometa plugins ARGS` (it must exit 0): its output and its tables."""
    assert main(["plugins", *args]) == 0
    out = capsys.readouterr().out
    return out, tables(out)


def test_two_distributions_with_one_entry_point_name_conflict_and_nothing_else_breaks(
        install: Install, capsys: pytest.CaptureFixture[str]) -> None:
    """Both `mlp` plugins are listed as conflicting; neither is usable, every other plugin is."""
    install("fakedist", {"mlp": "fakedist_mlp"}, {"fakedist_mlp": FAKE_MLP})
    out, (rows,) = listing(capsys)
    mlp_rows = [r for r in rows if r[0] == "mlp"]
    assert [r[1] for r in mlp_rows] == ["autometa-ml 0.1.0", "fakedist 1.0"]
    assert all(r[2].startswith("conflict: plugin 'mlp' is installed by 2 distributions "
                               "(autometa-ml 0.1.0, fakedist 1.0)") for r in mlp_rows)
    assert mlp_rows[1][3] == "source model mlp, source model fancy"
    assert "error: plugin 'mlp' is installed by 2 distributions (autometa-ml 0.1.0, fakedist " \
           "1.0); none of them is used: keep autometa's own with " \
           "AUTOMETA_DISABLE_PLUGINS=fakedist:mlp\n" in out
    assert ["maml", "autometa-ml 0.1.0", "ok", "meta-algorithm maml"] in rows

    host = autometa.create_host()
    assert "mlp" not in host.names("source") and "fancy" not in host.names("source")
    assert "conv4" in host.names("source") and "maml" in host.names("algorithm")
    for name in ("mlp", "fancy"):  # asked for by name: one line naming both distributions
        with pytest.raises(PluginError, match=rf"source model '{name}' is unavailable: .*"
                                              r"autometa-ml 0\.1\.0, fakedist 1\.0"):
            host.get("source", name)
    with pytest.raises(PluginError, match="installed by 2 distributions"):
        autometa.create_host(strict=True)


@pytest.mark.parametrize("dist", ["aaadist", "zzzdist"])
def test_a_conflict_with_a_first_party_entry_point_says_to_disable_the_third_party_one(
        install: Install, dist: str) -> None:
    """Whichever way the distributions sort, the fix offered keeps autometa's own `mlp`, and
    it works."""
    install(dist, {"mlp": "fakedist_mlp"}, {"fakedist_mlp": FAKE_MLP})
    (message,) = autometa.create_host().clashes()
    assert message.endswith(f"; none of them is used: keep autometa's own with "
                            f"AUTOMETA_DISABLE_PLUGINS={dist}:mlp"), message
    assert "autometa-ml:" not in message
    host = autometa.create_host(disabled=[f"{dist}:mlp"])
    assert host.clashes() == [] and host.get("source", "mlp").load() is MLP


@pytest.mark.parametrize("entry_point", ["amaml", "zmaml"])
def test_a_clash_with_a_first_party_entry_says_to_disable_the_third_party_plugin(
        install: Install, capsys: pytest.CaptureFixture[str], entry_point: str) -> None:
    """A third-party plugin registering `maml`, loaded before (amaml) or after (zmaml)
    autometa's own: the message names both and offers to disable the third-party one only."""
    install("fakedist", {entry_point: "fakedist_maml"}, {"fakedist_maml": """
        import autometa

        @autometa.hookimpl
        def register_meta_algorithms(register):
            register("maml", "fakedist_maml:Other")
    """})
    expected = (f"meta-algorithm 'maml' is registered by {{}}; uninstall or disable the "
                f"third-party one to keep autometa's own "
                f"(AUTOMETA_DISABLE_PLUGINS={entry_point})")
    pair = ["'maml' (autometa-ml 0.1.0)", f"'{entry_point}' (fakedist 1.0)"]
    who = " and ".join(pair if entry_point > "maml" else pair[::-1])
    host = autometa.create_host()
    assert host.clashes() == [expected.format(who)]
    with pytest.raises(PluginError) as refused:
        host.get("algorithm", "maml")
    assert str(refused.value) == expected.format(who)
    assert f"error: {expected.format(who)}" in listing(capsys)[0]
    host = autometa.create_host(disabled=[entry_point])  # the advice, followed
    from autometa_plugins.maml.algorithm import MAML

    assert host.clashes() == [] and host.get("algorithm", "maml").load() is MAML


def test_a_clash_between_third_party_plugins_is_unchanged(install: Install) -> None:
    """No first-party plugin in it: either one may go."""
    for dist in ("dista", "distb"):
        install(dist, {f"{dist}-plugin": f"{dist}_plugin"}, {f"{dist}_plugin": """
            import autometa

            @autometa.hookimpl
            def register_tasks(register):
                register("twin", "somewhere:Task")
        """})
    assert autometa.create_host().clashes() == [
        "task 'twin' is registered by 'dista-plugin' (dista 1.0) and 'distb-plugin' "
        "(distb 1.0); uninstall or disable one (AUTOMETA_DISABLE_PLUGINS=distb-plugin)"]


@pytest.mark.parametrize(("disable", "winner"), [("fakedist:mlp", MLP),
                                                 ("autometa-ml:mlp", "FakeMLP")])
def test_disabling_one_distributions_entry_point_lets_the_other_work(
        install: Install, monkeypatch: pytest.MonkeyPatch, disable: str, winner: object) -> None:
    """AUTOMETA_DISABLE_PLUGINS=dist:name blocks just that one; a plain name blocks both."""
    install("fakedist", {"mlp": "fakedist_mlp"}, {"fakedist_mlp": FAKE_MLP})
    monkeypatch.setenv("AUTOMETA_DISABLE_PLUGINS", f"maml, {disable}")
    host = autometa.create_host()
    dist = disable.partition(":")[0]
    assert host.plugins[f"{dist}:mlp"].status == "disabled"
    assert host.plugins["mlp"].status == "ok" and host.plugins["mlp"].distribution != dist
    cls = host.get("source", "mlp").load()
    assert cls is winner or cls.__name__ == winner
    assert "maml" not in host.names("algorithm")
    assert ("fancy" in host.names("source")) == (dist == "autometa-ml")

    host = autometa.create_host(disabled=["mlp"])
    assert {host.plugins[k].status for k in ("autometa-ml:mlp", "fakedist:mlp")} == {"disabled"}
    assert "mlp" not in host.plugins and "mlp" not in host.names("source")


def test_a_search_runs_with_the_other_plugins_while_a_name_conflicts(
        install: Install, monkeypatch: pytest.MonkeyPatch) -> None:
    """A second `finetune` distribution: finetune is refused by name, maml still searches."""
    install("fakedist", {"finetune": "fakedist_finetune"}, {"fakedist_finetune": """
        import autometa

        @autometa.hookimpl
        def register_meta_algorithms(register):
            register("finetune", "autometa_plugins.finetune.algorithm:Finetune")
    """})
    host = autometa.create_host()
    assert "finetune" not in host.names("algorithm")
    small = {"val_episodes": 2, "test_episodes": 2, "eval_queries": 5}
    with pytest.raises(PluginError, match="'finetune'.*autometa-ml 0.1.0, fakedist 1.0"):
        autometa.search("sinusoid", algorithms=["finetune"], sources=["mlp"], host=host,
                        task_params=small)
    board = autometa.search(
        "sinusoid", algorithms=["maml"], sources=["mlp"], n_trials=1, meta_steps=1,
        eval_every=1, host=host, algorithm_params={"maml": {"inner_steps": 1}},
        task_params=small)
    assert list(board.frame["algorithm"]) == ["maml"]
    monkeypatch.setenv("AUTOMETA_DISABLE_PLUGINS", "fakedist:finetune")
    assert "finetune" in autometa.create_host().names("algorithm")


def test_exits_misspelt_hooks_and_failing_entries_are_listed_and_never_a_traceback(
        install: Install, capsys: pytest.CaptureFixture[str]) -> None:
    """sys.exit() and other BaseExceptions at import, a misspelt hook, a conflict and entries
    that fail when used: one row each, one line of error each, exit 0."""
    install("fakedist", {"mlp": "fakedist_mlp"}, {"fakedist_mlp": FAKE_MLP})
    install("quitters", {"quitter": "quitter", "odd": "odd_base"}, {
        "quitter": "import sys\nsys.exit(3)\n",
        "odd_base": "class Odd(BaseException):\n    pass\n\nraise Odd('not an Exception')\n",
    })
    install("typo-dist", {"typo": "typo_hooks"}, {"typo_hooks": """
        import autometa

        @autometa.hookimpl
        def register_task(register):
            register("x", "m:a")
    """})
    install("failing", {"failing": "failing_entries"}, {
        "failing_entries": FAILING_ENTRIES, "exit_on_import": "raise SystemExit('bye')\n"})

    host = autometa.create_host()
    errors = {key: info.error or "" for key, info in host.plugins.items()}
    assert errors["quitter"] == "import failed: SystemExit: the plugin called sys.exit(3)"
    assert errors["odd"] == "import failed: Odd: not an Exception"
    assert errors["typo"].startswith("invalid hooks: unknown hook 'register_task' (did you "
                                     "mean 'register_tasks'?); hooks are register_commands, ")
    assert all(f" {hook}" in errors["typo"] for hook in ("register_tasks", "search_finished",
                                                          "trial_pruned", "search_failed"))
    assert host.plugins["failing"].status == "ok"
    assert not any("\n" in e for e in errors.values())

    out, (rows,) = listing(capsys)
    assert sorted(r[0] for r in rows) == sorted(info.name for info in host.plugins.values())
    status = {r[0]: r[2] for r in rows}
    assert status["quitter"] == "broken: import failed: SystemExit: the plugin called sys.exit(3)"
    assert status["typo"].startswith("broken: invalid hooks: unknown hook 'register_task' (did "
                                     "you mean 'register_tasks'?)")
    assert [r[0] for r in rows].count("mlp") == 2 and "Traceback" not in out

    out, (_, entries) = listing(capsys, "--verbose")
    space = {r[1]: r[4] for r in entries}
    assert space["bad-space"] == ("broken: meta-algorithm 'bad-space' from plugin 'failing' "
                                  "(failing 1.0) raised in search_space(): ValueError: no "
                                  "space on two lines")
    assert space["exits-on-load"].endswith("cannot be loaded from 'exit_on_import:Algo': "
                                           "SystemExit: the plugin called sys.exit('bye')")
    assert space["maml"].startswith("inner_lr in [0.001, 0.5] log")


def test_entries_that_fail_when_used_become_plugin_errors() -> None:
    """load(), check() and guard() turn any failure but Ctrl-C into one-line PluginErrors."""
    class Raising:
        @classmethod
        def search_space(cls, task=None):
            raise RuntimeError(f"space for {task}")

        @classmethod
        def incompatibility(cls, task):
            sys.exit("incompatible")

    def register(register):
        register("raising", Raising)
        register("bad-attr", "autometa:no_such_thing")

    host = autometa.create_host(entry_points=False, plugins={"p": types.SimpleNamespace(
        register_meta_algorithms=autometa.hookimpl(register))})
    reg = host.get("algorithm", "raising")
    assert host.check(reg) == ("meta-algorithm 'raising' from plugin 'p' raised in "
                               "search_space(): RuntimeError: space for None")
    assert "space for a task" in (host.check(reg, task="a task") or "")
    with pytest.raises(PluginError, match=r"incompatibility\(\): SystemExit: the plugin "
                                          r"called sys.exit\('incompatible'\)"):
        with reg.guard("raised in incompatibility()"):
            Raising.incompatibility(None)
    assert "AttributeError" in (host.check(host.get("algorithm", "bad-attr")) or "")
    with pytest.raises(KeyboardInterrupt):
        with reg.guard("interrupted"):
            raise KeyboardInterrupt
    good = autometa.create_host().get("algorithm", "maml")
    assert autometa.create_host().check(good) is None


def test_a_lifecycle_hook_that_exits_is_logged_not_fatal(caplog: pytest.LogCaptureFixture
                                                         ) -> None:
    """notify() survives a reporter calling sys.exit(); strict mode makes it a PluginError."""
    reporter = types.SimpleNamespace(search_started=autometa.hookimpl(
        lambda study_name, config: sys.exit(1)))
    host = autometa.create_host(entry_points=False, plugins={"reporter": reporter})
    event = SearchStarted("s", config=None, remaining=None)  # type: ignore[arg-type]
    host.notify("search_started", event, study_name="s", config=None)
    assert "'reporter' failed in hook search_started" in caplog.text
    strict = autometa.create_host(entry_points=False, strict=True,
                                  plugins={"reporter": reporter})
    with pytest.raises(PluginError, match="sys.exit"):
        strict.notify("search_started", event, study_name="s", config=None)
