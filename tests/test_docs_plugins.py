"""docs/plugins.md, the plugin author guide, kept honest: it documents every hook, event,
trial attribute, public module, fixture and kit function the code has, and nothing the
code lacks; its Python examples compile and its shell examples run real commands."""

from __future__ import annotations

import ast
import dataclasses
import re
import shlex
from pathlib import Path

import pytest

import autometa
import autometa.events
import autometa.hookspecs
import autometa.testing
from autometa.cli.app import COMMANDS
from autometa.plugins import DISTRIBUTION

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "plugins.md"
FIXTURES = REPO / "autometa" / "testing" / "pytest_plugin.py"
#: Fence languages whose lines are commands typed in a shell.
SHELL = {"sh", "bash", "shell", "console"}


def text() -> str:
    return DOC.read_text(encoding="utf-8")


def section(title: str, level: int = 2) -> str:
    """The body under heading ``title`` at ``level``, up to the next heading at that level or
    above (code blocks are skipped when looking for headings)."""
    lines = text().splitlines()
    heading = "#" * level + " " + title
    fenced, start = False, None
    for i, line in enumerate(lines):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if fenced:
            continue
        if start is None:
            if line.strip() == heading:
                start = i + 1
        elif re.match(rf"#{{1,{level}}} ", line):
            return "\n".join(lines[start:i])
    assert start is not None, f"docs/plugins.md has no heading {heading!r}"
    return "\n".join(lines[start:])


def code_blocks(body: str) -> list[tuple[str, str]]:
    """``(language, code)`` of every fenced block of ``body`` (indented ones too)."""
    blocks, lang, lines, indent = [], None, [], 0
    for line in body.splitlines():
        stripped = line.lstrip()
        if lang is None:
            if stripped.startswith("```"):
                lang, lines, indent = stripped[3:].strip(), [], len(line) - len(stripped)
        elif stripped.startswith("```"):
            blocks.append((lang, "\n".join(lines)))
            lang = None
        else:
            lines.append(line[indent:])
    assert lang is None, "docs/plugins.md has an unclosed code block"
    return blocks


def ticked(body: str) -> set[str]:
    """Every ``code`` span of ``body``."""
    return set(re.findall(r"`([^`\n]+)`", body))


def hook_names() -> set[str]:
    """The hooks of autometa/hookspecs.py: functions pluggy's marker flagged."""
    marker = f"{autometa.hookspecs.PROJECT}_spec"
    return {name for name, obj in vars(autometa.hookspecs).items()
            if callable(obj) and hasattr(obj, marker)}


def module_all(module: str) -> list[str]:
    """A module's ``__all__`` read from its source (importing it would import torch)."""
    parts = module.split(".")
    path = REPO.joinpath(*parts).with_suffix(".py")
    if not path.is_file():
        path = REPO.joinpath(*parts, "__init__.py")
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        targets = node.targets if isinstance(node, ast.Assign) else \
            [node.target] if isinstance(node, ast.AnnAssign) else []
        if any(isinstance(t, ast.Name) and t.id == "__all__" for t in targets):
            assert node.value is not None
            return list(ast.literal_eval(node.value))
    raise AssertionError(f"{module} has no __all__")


def fixture_names() -> list[str]:
    """Functions of autometa/testing/pytest_plugin.py decorated with ``pytest.fixture``."""
    def is_fixture(decorator: ast.expr) -> bool:
        target = decorator.func if isinstance(decorator, ast.Call) else decorator
        return (isinstance(target, ast.Attribute) and target.attr == "fixture") or \
            (isinstance(target, ast.Name) and target.id == "fixture")

    tree = ast.parse(FIXTURES.read_text(encoding="utf-8"))
    return [node.name for node in tree.body if isinstance(node, ast.FunctionDef)
            and any(is_fixture(d) for d in node.decorator_list)]


# -- hooks, events, trial attributes ---------------------------------------------------------
def test_every_hook_has_a_heading_and_every_heading_is_a_hook() -> None:
    hooks = hook_names()
    assert len(hooks) >= 10, f"found only {sorted(hooks)} in autometa/hookspecs.py"
    headings = re.findall(r"^### `([^`]+)`\s*$", section("Hook reference"), re.M)
    missing = hooks - set(headings)
    assert not missing, f"add a '### `name`' section to docs/plugins.md for {sorted(missing)}"
    unknown = set(headings) - hooks
    assert not unknown, f"docs/plugins.md documents hooks that do not exist: {sorted(unknown)}"
    assert len(headings) == len(set(headings)), "a hook is documented twice"


def test_each_hook_section_gives_its_signature() -> None:
    import inspect

    body = section("Hook reference")
    for name in hook_names():
        own = section(f"`{name}`", level=3)
        args = ", ".join(inspect.signature(getattr(autometa.hookspecs, name)).parameters)
        assert f"`{name}({args})`" in own, f"state the signature `{name}({args})` under {name}"
        assert any(lang == "python" and f"def {name}(" in code
                   for lang, code in code_blocks(own)), f"give an example of {name}"
    assert body


def test_every_trial_attribute_is_in_the_table() -> None:
    body = section("Trial attributes", level=3)
    first_cells = re.findall(r"^\|\s*`([^`]+)`\s*\|", body, re.M)
    keys = set(autometa.events.TRIAL_ATTRS)
    assert keys, "TRIAL_ATTRS is empty"
    missing = keys - set(first_cells)
    assert not missing, f"add rows for {sorted(missing)} to the trial attributes table"
    unknown = set(first_cells) - keys
    assert not unknown, f"the trial attributes table lists unknown keys {sorted(unknown)}"


def test_every_event_and_its_fields_are_in_the_events_table() -> None:
    body = section("Events", level=3)
    rows = {m.group(1): m.group(0) for m in re.finditer(r"^\|\s*`(\w+)`\s*\|.*$", body, re.M)}
    base = {f.name for f in dataclasses.fields(autometa.events.Event)}
    classes = [getattr(autometa.events, n) for n in autometa.events.__all__
               if dataclasses.is_dataclass(getattr(autometa.events, n))]
    assert len(classes) >= 8, classes
    for cls in classes:
        assert cls.__name__ in rows, f"add a row for {cls.__name__} to the events table"
        own = {f.name for f in dataclasses.fields(cls)} - (set() if cls is
                                                          autometa.events.Event else base)
        missing = {f for f in own if f"`{f}`" not in rows[cls.__name__]}
        assert not missing, f"the {cls.__name__} row lacks the fields {sorted(missing)}"
    for name in autometa.events.__all__:
        assert name in text(), f"docs/plugins.md does not mention autometa.events.{name}"


# -- public API, testing ----------------------------------------------------------------------
def test_every_public_module_is_in_the_stability_section() -> None:
    body = section("Public API and stability")
    spans = ticked(body)
    missing = [m for m in autometa.PUBLIC_MODULES if m not in spans]
    assert not missing, f"name {missing} in the 'Public API and stability' section"
    assert "DeprecationWarning" in body and f"{DISTRIBUTION}>=" in body


def test_names_said_to_be_public_are_in_their_modules_all() -> None:
    """A row ``| `autometa.x` | ... `name` ... |`` names only what ``autometa.x.__all__``
    holds: the guide never promises a name the code does not export."""
    rows = re.findall(r"^\|\s*`(autometa[\w.]*)`\s*\|(.*)\|\s*$",
                      section("Public API and stability"), re.M)
    assert len(rows) == len(autometa.PUBLIC_MODULES), "one table row per public module"
    for module, cell in rows:
        public = set(autometa.__all__ if module == "autometa" else module_all(module))
        named = {s for s in ticked(cell) if s.isidentifier()}
        assert named <= public, f"{module} does not export {sorted(named - public)}"


def test_every_fixture_and_kit_function_is_in_the_testing_section() -> None:
    body = section("Testing your plugin")
    spans = " ".join(ticked(body))
    fixtures = fixture_names()
    assert len(fixtures) >= 4, f"found only {fixtures} in {FIXTURES.name}"
    for name in [*fixtures, *autometa.testing.__all__]:
        assert re.search(rf"\b{name}\b", spans), f"document {name} under 'Testing your plugin'"
    assert "AUTOMETA_STRICT_PLUGINS=1" in body and "create_host(entry_points=False" in body


def test_each_fixture_is_documented_with_its_signature() -> None:
    """A fixture whose docstring opens with its call (````autometa_task(name=...)````) is
    documented with that exact call, so that the guide follows the code."""
    body = section("Testing your plugin")
    tree = ast.parse(FIXTURES.read_text(encoding="utf-8"))
    found = 0
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name in fixture_names():
            doc = ast.get_docstring(node) or ""
            call = re.match(rf"``({node.name}\(.*?\))``", " ".join(doc.split()))
            if call:
                found += 1
                assert f"`{call.group(1)}`" in " ".join(body.split()), \
                    f"document the fixture as `{call.group(1)}`"
    assert found, "no fixture docstring states its call; this check would check nothing"


# -- examples ---------------------------------------------------------------------------------
def test_every_python_block_compiles() -> None:
    blocks = [code for lang, code in code_blocks(text()) if lang in ("python", "py")]
    assert len(blocks) >= 20, f"only {len(blocks)} Python blocks found"
    for i, code in enumerate(blocks):
        try:
            compile(code, f"docs/plugins.md python block {i}", "exec")
        except SyntaxError as exc:
            pytest.fail(f"Python block {i} does not compile: {exc}\n{code}")


def test_shell_examples_run_real_commands() -> None:
    commands = []
    for lang, code in code_blocks(text()):
        if lang not in SHELL:
            continue
        for line in code.splitlines():
            line = line.strip().removeprefix("$ ")
            if not line.startswith("autometa "):
                continue
            words = [w for w in shlex.split(line, comments=True)[1:] if not w.startswith("-")]
            commands.append(words[0] if words else "--help")
    assert len(commands) >= 5, commands
    unknown = sorted({c for c in commands if c != "--help" and c not in COMMANDS})
    assert not unknown, f"docs/plugins.md runs unknown commands {unknown}; " \
                        f"commands are {sorted(COMMANDS)}"


def test_required_sections_are_there() -> None:
    for title in ("Public API and stability", "Tasks", "Source models", "Meta-algorithms",
                  "Reporters and lifecycle hooks",
                  "Pruners, samplers, report formats and commands", "Hook reference",
                  "Plugin options", "Testing your plugin", "Listing and debugging",
                  "Publishing"):
        assert section(title).strip(), title
    assert text().startswith("# Writing autometa plugins\n")
    assert section("Gradient-based meta-learners", level=3).strip()
