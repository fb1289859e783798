"""What a non-editable install (``pip install .``) ships: every package of the tree.

``tests/test_plugin_template.py`` checks it the slow way, installing into a fresh venv;
this checks the list in pyproject.toml against the folders at once.
"""

from __future__ import annotations

import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_of_the_tree_is_listed_in_pyproject() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    listed = set(config["tool"]["setuptools"]["packages"])
    found = set()
    for top, name in (("autometa", "autometa"), ("plugins", "autometa_plugins")):
        for init in (ROOT / top).rglob("__init__.py"):
            if "templates" in init.relative_to(ROOT).parts:  # package data, not code
                continue
            parts = init.parent.relative_to(ROOT / top).parts
            found.add(".".join((name, *parts)))
    assert found - listed == set(), "add these to [tool.setuptools] packages in pyproject.toml"
    assert listed - found == set(), "these listed packages do not exist"
