"""The public API's promise: first-party plugins import only what a third party could.

A plugin imports autometa's public modules (``autometa.PUBLIC_MODULES``) and, from each,
only the names in its ``__all__``; it imports no other first-party plugin's internals. The
first-party plugins are templates for third-party ones, so they are held to this by
reading their source (``ast``), not by running them.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from limits import QUICK_SUBPROCESS

import autometa
from autometa import PUBLIC_MODULES
from autometa.testing.imports import FIRST_PARTY_PLUGINS, import_problems
from autometa.testing.imports import public_module as _module

PLUGINS = Path(__file__).resolve().parents[1] / "plugins"
#: The import name of the folder plugins/ (pyproject.toml's package-dir).
PLUGIN_PACKAGE = FIRST_PARTY_PLUGINS


def _problems(file: Path) -> Iterator[str]:
    """What ``file`` (under plugins/) imports beyond the public API, one message each: the
    conformance kit's own reading (``check_plugin`` applies it to third-party plugins)."""
    relative = file.relative_to(PLUGINS)
    own = f"{PLUGIN_PACKAGE}.{relative.parts[0]}" if len(relative.parts) > 1 else None
    return import_problems(file, shown=f"plugins/{relative.as_posix()}", own=own)


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
                            timeout=QUICK_SUBPROCESS)
    assert result.returncode == 0, result.stderr
