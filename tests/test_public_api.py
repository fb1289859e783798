"""The public API's promise: first-party plugins import only what a third party could.

A plugin imports autometa's public modules (``autometa.PUBLIC_MODULES``) and, from each,
only the names in its ``__all__``; it imports no other first-party plugin's internals. The
first-party plugins are templates for third-party ones, so they are held to this by
reading their source (``ast``), not by running them.
"""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

import autometa
from autometa import PUBLIC_MODULES

PLUGINS = Path(__file__).resolve().parents[1] / "plugins"
#: The import name of the folder plugins/ (pyproject.toml's package-dir).
PLUGIN_PACKAGE = "autometa_plugins"


def _module(name: str) -> ModuleType | None:
    """The public module ``name``, or None if it does not exist (yet)."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name != name:  # the module exists but one of its own imports is missing
            raise
        return None


def _imports(tree: ast.AST) -> Iterator[tuple[int, str, list[str]]]:
    """(line, absolute module, names imported from it) for every import in ``tree``."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, []
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module, [alias.name for alias in node.names]


def _problems(file: Path) -> Iterator[str]:
    """What ``file`` (under plugins/) imports beyond the public API, one message each."""
    relative = file.relative_to(PLUGINS)
    own = f"{PLUGIN_PACKAGE}.{relative.parts[0]}" if len(relative.parts) > 1 else None
    for line, module, names in _imports(ast.parse(file.read_text(), str(file))):
        where = f"plugins/{relative.as_posix()}:{line}"
        top = module.split(".")[0]
        if top == "autometa":
            if module not in PUBLIC_MODULES:
                yield (f"{where}: imports {module}, which is not a public module "
                       f"(autometa.PUBLIC_MODULES); import from a public module instead, or "
                       f"make {module} public")
                continue
            public = _module(module)
            if public is None:
                continue  # a public module still to be written (autometa.events)
            exported = getattr(public, "__all__", None)
            for name in names:
                # `from autometa import task` imports a submodule: checked as a module.
                submodule = f"{module}.{name}"
                if submodule in PUBLIC_MODULES:
                    continue
                if exported is None:
                    yield (f"{where}: 'from {module} import {name}', but {module} has no "
                           f"__all__; declare its public names in __all__")
                elif name not in exported:
                    yield (f"{where}: 'from {module} import {name}', but {name} is not in "
                           f"{module}.__all__; use a public name, or add {name} to "
                           f"{module}.__all__ if plugins should rely on it")
        elif top == PLUGIN_PACKAGE and module != PLUGIN_PACKAGE:
            target = ".".join(module.split(".")[:2])
            if target != own:
                yield (f"{where}: imports {module}, another plugin's internals; a plugin "
                       f"uses autometa's public API only: move what is shared into autometa "
                       f"(public, in __all__) or copy it")


def test_plugins_import_only_the_public_api() -> None:
    files = sorted(PLUGINS.rglob("*.py"))
    assert len(files) > 20, f"found only {len(files)} files under {PLUGINS}"
    problems = [p for file in files for p in _problems(file)]
    assert not problems, "\n".join(problems)


def test_the_checker_catches_each_kind_of_breach(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    plugin = tmp_path / "mine"
    plugin.mkdir()
    (plugin / "algorithm.py").write_text(
        "from autometa.trial import evaluate\n"
        "from autometa.inner_loop import _lr, adapt\n"
        "import autometa.engine.run\n"
        "from autometa_plugins.maml.algorithm import MAML\n"
        "from autometa_plugins.mine.helpers import helper\n"
        "from autometa import GradientMetaLearner, task\n"
    )
    monkeypatch.setattr(sys.modules[__name__], "PLUGINS", tmp_path)
    problems = list(_problems(plugin / "algorithm.py"))
    assert len(problems) == 4, problems
    assert problems[0].startswith("plugins/mine/algorithm.py:1: imports autometa.trial")
    assert "_lr is not in autometa.inner_loop.__all__" in problems[1]
    assert "imports autometa.engine.run" in problems[2]
    assert "autometa_plugins.maml.algorithm, another plugin's internals" in problems[3]


@pytest.mark.parametrize("name", PUBLIC_MODULES)
def test_every_public_module_declares_its_names(name: str) -> None:
    """Each public module has an ``__all__``, and every name in it resolves (for autometa
    itself, through the lazy imports)."""
    module = _module(name)
    if module is None:
        pytest.skip(f"{name} does not exist yet")
    exported = getattr(module, "__all__", None)
    assert isinstance(exported, (list, tuple)), (
        f"{name} has no __all__; list the names plugins may use in it")
    missing = [n for n in exported if not hasattr(module, n)]
    assert not missing, f"{name}.__all__ lists {missing}, which {name} does not define"


def test_public_modules_are_listed_once_and_are_autometa_modules() -> None:
    assert len(set(PUBLIC_MODULES)) == len(PUBLIC_MODULES)
    assert all(n == "autometa" or n.startswith("autometa.") for n in PUBLIC_MODULES)
    assert "autometa" in PUBLIC_MODULES and "GradientMetaLearner" in autometa.__all__


def test_importing_autometa_does_not_import_torch() -> None:
    code = ("import sys, autometa; autometa.PUBLIC_MODULES; "
            "assert 'torch' not in sys.modules, 'importing autometa imported torch'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
