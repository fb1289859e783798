"""`autometa plugins --json` and `--verbose`: every plugin and entry with its settings (type,
default or required, searched) and search space, run as a user runs it, next to installed
third-party distributions (dist-info directories on PYTHONPATH) that are broken in every way."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from limits import QUICK_SUBPROCESS

import autometa
from autometa.cli.plugins import entry_json, jsonable

#: A third-party plugin: a task with a required setting and odd defaults, entries that fail
#: when used, and plugin text holding rich markup.
THIRD_PARTY = """
    import autometa

    class NeedsPath:
        params = {"shots": autometa.Int(1, 10)}

        def __init__(self, *, path: str, shots: int = 5, pair: tuple = (1, 2),
                     big: float = float("inf"), thing: object = object(), seed: int = 0,
                     device: str = "cpu"):
            pass

    class BadSpace:
        @classmethod
        def search_space(cls):
            raise ValueError("no space\\non two lines")

    class Markup:
        def __init__(self, model, task, *, tag: str = "[red]x[/red]"):
            pass

        @classmethod
        def search_space(cls):
            return {"tag": autometa.Categorical(("[red]x[/red]", "[b]y[/b]"))}

    @autometa.hookimpl
    def register_tasks(register):
        register("needs-path", NeedsPath, description="a task that needs a path")

    @autometa.hookimpl
    def register_meta_algorithms(register):
        register("bad-space", BadSpace)
        register("exits-on-load", "exit_on_import:Algo")
        register("markup", Markup, description="[bold red]loud[/bold red]")
"""


def install(site: Path, dist: str, eps: dict[str, str], sources: dict[str, str]) -> None:
    """An installed distribution: its dist-info (metadata, entry points) and modules."""
    info = site / f"{dist}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    lines = "".join(f"{name} = {target}\n" for name, target in eps.items())
    (info / "entry_points.txt").write_text(f"[autometa]\n{lines}")
    for module, source in sources.items():
        (site / f"{module}.py").write_text(textwrap.dedent(source))


def plugins_cli(flag: str, site: Path) -> subprocess.CompletedProcess[str]:
    """`autometa plugins FLAG` with the distributions installed in ``site``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTOMETA_")}
    env.update(PYTHONPATH=str(site), COLUMNS="200")
    return subprocess.run([sys.executable, "-m", "autometa", "plugins", flag], cwd=site.parent,
                          env=env, capture_output=True, text=True, timeout=QUICK_SUBPROCESS)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, subprocess.CompletedProcess[str]]:
    """`autometa plugins --json` and `autometa plugins -v`, with the fake distributions."""
    site = tmp_path_factory.mktemp("cli_plugins") / "site"
    install(site, "third-party", {"third": "third_plugin"},
            {"third_plugin": THIRD_PARTY, "exit_on_import": "raise SystemExit('bye')\n"})
    install(site, "broken-dist", {"broken": "broken_plugin"},
            {"broken_plugin": "raise RuntimeError('broken on purpose')\n"})
    return {flag: plugins_cli(flag, site) for flag in ("--json", "-v")}


@pytest.fixture(scope="module")
def document(runs: dict[str, subprocess.CompletedProcess[str]]) -> dict[str, Any]:
    result = runs["--json"]
    assert result.returncode == 0, result.stderr
    parsed: dict[str, Any] = json.loads(result.stdout)  # the whole of stdout, nothing else
    return parsed


def plugin(document: dict[str, Any], name: str) -> dict[str, Any]:
    (found,) = [p for p in document["plugins"] if p["name"] == name]
    return found


def entry(document: dict[str, Any], plugin_name: str, name: str) -> dict[str, Any]:
    (found,) = [e for e in plugin(document, plugin_name)["provides"] if e["name"] == name]
    return found


def test_json_is_the_only_thing_on_stdout(runs: dict[str, subprocess.CompletedProcess[str]],
                                          document: dict[str, Any]) -> None:
    """The broken plugin's warning goes to stderr; no traceback anywhere."""
    result = runs["--json"]
    assert result.stdout.startswith("{")
    assert "plugin 'broken' is broken and skipped" in result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert document["autometa"] == autometa.__version__
    assert document["clashes"] == []
    assert set(plugin(document, "maml")) == {"name", "distribution", "version", "status",
                                             "error", "kinds", "hooks", "provides"}


def test_a_plugin_printing_at_import_does_not_spoil_the_json(tmp_path: Path) -> None:
    site = tmp_path / "site"
    install(site, "chatty", {"chatty": "chatty_plugin"},
            {"chatty_plugin": "print('hello from an import')\n"})
    result = plugins_cli("--json", site)
    assert result.returncode == 0, result.stderr
    assert "hello from an import" in result.stderr
    assert plugin(json.loads(result.stdout), "chatty")["status"] == "ok"


def test_json_lists_maml_with_its_space_and_settings(document: dict[str, Any]) -> None:
    from autometa_plugins.maml.algorithm import MAML

    maml = plugin(document, "maml")
    assert maml["distribution"] == "autometa-ml" and maml["version"] == autometa.__version__
    assert (maml["status"], maml["error"], maml["kinds"]) == ("ok", None, ["algorithm"])
    (provided,) = maml["provides"]
    assert (provided["kind"], provided["name"], provided["status"]) == ("algorithm", "maml", "ok")
    declared = MAML.search_space()["inner_lr"]
    assert declared.log
    assert provided["search_space"]["inner_lr"] == {"type": "float", "low": declared.low,
                                                    "high": declared.high, "log": True}
    assert provided["search_space"]["first_order"] == {"type": "categorical",
                                                       "choices": [False, True]}
    settings = {p["name"]: p for p in provided["parameters"]}
    assert not {"model", "task", "self"} & set(settings)
    defaults = {n: p.default for n, p in inspect.signature(MAML).parameters.items()}
    assert settings["inner_lr"] == {"name": "inner_lr", "type": "a finite number",
                                    "default": defaults["inner_lr"], "required": False,
                                    "searched": True}
    assert settings["strategy"] == {"name": "strategy", "type": "one of 'auto', 'vmap', 'loop'",
                                    "default": "auto", "required": False, "searched": False}


def test_json_shows_required_task_settings_and_odd_defaults(document: dict[str, Any]) -> None:
    """No default is `required`; tuples, inf and objects come out as JSON; seed and device
    are the engine's, not settings; a task's params are checked ranges, never searched."""
    third = plugin(document, "third")
    assert (third["distribution"], third["version"], third["status"]) == ("third-party", "1.0",
                                                                          "ok")
    assert third["kinds"] == ["algorithm", "task"]
    task = entry(document, "third", "needs-path")
    assert task["search_space"] == {"shots": {"type": "int", "low": 1, "high": 10, "log": False}}
    settings = {p["name"]: p for p in task["parameters"]}
    assert list(settings) == ["path", "shots", "pair", "big", "thing"]
    assert settings["path"] == {"name": "path", "type": "text", "default": None,
                                "required": True, "searched": False}
    assert settings["shots"]["default"] == 5 and not settings["shots"]["searched"]
    assert settings["pair"]["default"] == [1, 2] and settings["big"]["default"] == "inf"
    assert settings["thing"]["default"].startswith("<object object at")
    assert entry(document, "csv", "csv")["parameters"][0]["name"] == "path"


def test_json_lists_broken_plugins_and_entries_with_their_errors(
        document: dict[str, Any]) -> None:
    broken = plugin(document, "broken")
    assert (broken["distribution"], broken["status"], broken["provides"]) == ("broken-dist",
                                                                              "broken", [])
    assert broken["error"] == "import failed: RuntimeError: broken on purpose"
    bad = entry(document, "third", "bad-space")
    assert (bad["status"], bad["search_space"], bad["parameters"]) == ("broken", None, None)
    assert bad["error"] == ("meta-algorithm 'bad-space' from plugin 'third' (third-party 1.0) "
                            "raised in search_space(): ValueError: no space on two lines")
    exits = entry(document, "third", "exits-on-load")
    assert exits["status"] == "broken"
    assert exits["error"].endswith("SystemExit: the plugin called sys.exit('bye')")
    markup = entry(document, "third", "markup")
    assert markup["status"] == "ok" and markup["description"] == "[bold red]loud[/bold red]"


def tables(out: str) -> list[dict[str, list[list[str]]]]:
    """The rich tables in ``out``: ``{"kind name": the lines of each cell}`` per table."""
    found: list[dict[str, list[list[str]]]] = []
    key = ""
    for line in out.splitlines():
        if line.startswith("┏"):
            found.append({})
        elif line.startswith("│") and found:
            cells = [c.strip() for c in line.strip("│").split("│")]
            if any(cells[:2]):
                key = " ".join(c for c in cells[:2] if c)
                found[-1][key] = [[c] for c in cells]
            else:  # the row above continues
                for lines, cell in zip(found[-1][key], cells, strict=True):
                    lines.extend([cell] if cell else [])
    return found


def test_verbose_shows_each_setting_on_its_own_line_without_markup(
        runs: dict[str, subprocess.CompletedProcess[str]]) -> None:
    result = runs["-v"]
    assert result.returncode == 0, result.stderr
    _, entries = tables(result.stdout)
    lines = {key: row[-1] for key, row in entries.items()}
    assert lines["meta-algorithm maml"][0] == (
        "inner_lr in [0.001, 0.5] log (searched): a finite number, default 0.01")
    assert "strategy: one of 'auto', 'vmap', 'loop', default 'auto'" in lines[
        "meta-algorithm maml"]
    # A conditional parameter says when it is searched.
    assert ("lora_rank in [2, 32] log (searched when adapter='lora'): an integer, default 8"
            in lines["meta-algorithm maml"])
    assert lines["task needs-path"][:2] == ["path: text, required",
                                            "shots in [1, 10]: an integer, default 5"]
    # Plugin text is shown as written: rich markup is not interpreted.
    assert entries["meta-algorithm markup"][3] == ["[bold red]loud[/bold red]"]
    assert lines["meta-algorithm markup"] == [
        "tag in {'[red]x[/red]', '[b]y[/b]'} (searched): text, default '[red]x[/red]'"]
    assert lines["meta-algorithm bad-space"][0].startswith("broken: meta-algorithm 'bad-space'")


def test_kinds_without_a_space_are_listed_without_importing_their_factory() -> None:
    """A kind the host may gain (a pruner, a report format) has no settings to read."""
    reg = autometa.Registration("pruner", "median", "no_such_module_xyz:Pruner", "p",
                                description="median stopping")
    assert entry_json(reg) == {"kind": "pruner", "name": "median",
                               "description": "median stopping", "status": "ok",
                               "error": None, "search_space": None, "parameters": None}
    assert "no_such_module_xyz" not in sys.modules


def test_anything_a_plugin_declares_becomes_json() -> None:
    value = {"t": (1, (2.5, float("nan"))), 3: {"x": -float("inf")}, "o": Path("a")}
    assert json.loads(json.dumps(jsonable(value), allow_nan=False)) == {
        "t": [1, [2.5, "nan"]], "3": {"x": "-inf"}, "o": repr(Path("a"))}


@pytest.mark.parametrize(("flag", "name", "line"), [
    ("--task", "no-such-task", "unknown task 'no-such-task'"),
    ("--sources", "MLP", "unknown source model 'MLP' (did you mean 'mlp'?)"),
    ("--algorithms", "mamll", "unknown meta-algorithm 'mamll' (did you mean 'maml'?)"),
])
def test_a_misspelt_plugin_is_refused_before_torch_is_imported(tmp_path, flag, name, line):
    """A wrong name is one line at once: torch, Optuna and pandas (seconds to import under
    load) are not imported to say so, and nothing is written."""
    argv = ["run", "--task", "sinusoid", flag, name, "--trials", "1",
            "--storage", f"sqlite:///{tmp_path / 's.db'}"]
    code = ("import sys\nfrom autometa.cli import main\n"
            f"rc = main({argv!r})\n"
            "print(rc, *(m in sys.modules for m in ('torch', 'optuna', 'pandas')))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=QUICK_SUBPROCESS, cwd=tmp_path)
    assert done.stdout.split() == ["2", "False", "False", "False"], done.stderr
    assert done.stderr.startswith(f"autometa: error: {line}") and done.stderr.count("\n") == 1
    assert list(tmp_path.iterdir()) == []
