"""Conformance kit: run it on your plugin, its Task, SourceModel and MetaAlgorithm classes.

Every first-party plugin passes these checks in autometa's own test suite; a third-party
plugin should too. They are plain functions raising ``AssertionError`` with a message that
says which part of the contract is broken and points at the file and line of the code at
fault, so they work under any test runner::

    import my_plugin
    from my_plugin.task import MyTask
    from autometa.testing import check_plugin, check_task

    def test_my_plugin_registers_lazily():
        check_plugin(my_plugin, name="my-plugin")  # hooks, registrations, no torch at import

    def test_my_task():
        check_task(MyTask, ways=5)

``check_task``, ``check_source_model`` and ``check_meta_algorithm`` (in
:mod:`autometa.testing.checks`) check the three contracts, the way the engine calls them;
``check_plugin`` (:mod:`autometa.testing.registration`) checks the hooks and registrations
the way the host loads them. Under pytest, :mod:`autometa.testing.pytest_plugin` (installed
with autometa) adds fixtures that build registered tasks and source models and run tiny
searches with your plugin.

Importing this package is cheap: the checks, which import torch, load on first use, so that
pytest can load the fixtures into any test suite at no cost.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = ["NameClashWarning", "check_meta_algorithm", "check_plugin", "check_source_model",
           "check_space", "check_task"]

# Public name -> module that defines it, imported on first use (the checks import torch).
_LAZY = {
    "check_meta_algorithm": "autometa.testing.checks",
    "check_source_model": "autometa.testing.checks",
    "check_space": "autometa.testing.checks",
    "check_task": "autometa.testing.checks",
    "check_plugin": "autometa.testing.registration",
    "NameClashWarning": "autometa.testing.registration",
}

if TYPE_CHECKING:
    from autometa.testing.checks import (
        check_meta_algorithm,
        check_source_model,
        check_space,
        check_task,
    )
    from autometa.testing.registration import NameClashWarning, check_plugin


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'autometa.testing' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
