"""A plugin's imports of autometa, read from its source: :func:`import_problems`.

The public API (README, "Public API") is ``autometa.__all__`` and the ``__all__`` of each
module in ``autometa.PUBLIC_MODULES``; a plugin that imports anything else (the engine, a
name starting with ``_``, a module's unlisted helper) may break in any release. A plugin
also never imports ``autometa_plugins`` (autometa's own plugins) beyond its own package:
they are examples to copy, not an API. Read with :mod:`ast`, nothing is imported but the
public modules themselves (to read their ``__all__``).
"""

from __future__ import annotations

import ast
import importlib
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

__all__ = ["FIRST_PARTY_PLUGINS", "import_problems", "public_module"]

#: The import name of autometa's own plugins (the repository's plugins/ folder).
FIRST_PARTY_PLUGINS = "autometa_plugins"


def public_module(name: str) -> ModuleType | None:
    """The public module ``name``, or None if this autometa does not have it."""
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


def import_problems(file: Path, *, shown: str, own: str | None = None) -> Iterator[str]:
    """What ``file`` imports beyond autometa's public API, one message each.

    Args:
        file: a Python source file of the plugin.
        shown: how messages name the file (``plugins/maml/algorithm.py``).
        own: the plugin's own package under ``autometa_plugins`` (first-party plugins:
            ``autometa_plugins.maml``), whose imports are its own business.
    """
    from autometa import PUBLIC_MODULES

    for line, module, names in _imports(ast.parse(file.read_text(encoding="utf-8"),
                                                  str(file))):
        where = f"{shown}:{line}"
        top = module.split(".")[0]
        if top == "autometa":
            if module not in PUBLIC_MODULES:
                yield (f"{where}: imports {module}, which is not a public module "
                       f"(autometa.PUBLIC_MODULES); import from a public module instead")
                continue
            public = public_module(module)
            if public is None:
                continue
            exported = getattr(public, "__all__", None)
            for name in names:
                if f"{module}.{name}" in PUBLIC_MODULES:  # `from autometa import task`
                    continue
                if exported is None:
                    yield (f"{where}: 'from {module} import {name}', but {module} has no "
                           "__all__; declare its public names in __all__")
                elif name not in exported:
                    yield (f"{where}: 'from {module} import {name}', but {name} is not in "
                           f"{module}.__all__ (not public: it may change in any release)")
        elif top == FIRST_PARTY_PLUGINS and module != FIRST_PARTY_PLUGINS:
            if ".".join(module.split(".")[:2]) != own:
                yield (f"{where}: imports {module}, another plugin's internals; a plugin "
                       "uses autometa's public API only: copy what it needs")
