"""The architecture the tree shows: imports point one way, modules stay small.

The layers themselves are checked by import-linter (``lint-imports`` in ``make test``, the
contract in pyproject.toml). These tests check, independently of it and with the standard
library only, that no import cycle exists among autometa's modules at all (within a
layer too), counting every kind of import: module level, inside functions, and under
``TYPE_CHECKING``; that no module grows past :data:`MAX_LINES`; and that the contract and
ARCHITECTURE.md's layer table list the same layers in the same order.
"""

from __future__ import annotations

import ast
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
#: The most lines a module may have: past it, a module is usually two concepts.
MAX_LINES = 500


def modules(package_dir: Path, package: str) -> dict[str, Path]:
    """``{dotted module name: file}`` of every module under ``package_dir``."""
    out = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = [package, *path.relative_to(package_dir).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def imports(name: str, path: Path, known: dict[str, Path]) -> Iterator[tuple[str, int]]:
    """``(module imported, line)`` for every import in ``path`` of a module in ``known``,
    wherever it stands (module level, a function, an ``if TYPE_CHECKING:`` block).

    ``from package import name`` imports the submodule ``package.name`` when there is one,
    else the package itself (its ``__init__``).
    """
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base
                       for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `import a.b.c` names a.b.c's module
                target = target.rpartition(".")[0]
            if target and target != name:
                yield target, node.lineno


def import_graph(package_dir: Path, package: str) -> dict[str, dict[str, int]]:
    """``{module: {module it imports: line of the first such import}}``."""
    known = modules(package_dir, package)
    graph: dict[str, dict[str, int]] = {m: {} for m in known}
    for name, path in known.items():
        for target, line in imports(name, path, known):
            graph[name].setdefault(target, line)
    return graph


def find_cycle(graph: dict[str, dict[str, int]]) -> list[str]:
    """One import cycle ``[a, b, ..., a]`` in ``graph``, or [] if there is none."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        state[node] = 2
        path.pop()
        return []

    for start in sorted(graph):
        if start not in state:
            found = visit(start)
            if found:
                return found
    return []


def describe(cycle: list[str], graph: dict[str, dict[str, int]]) -> str:
    return " -> ".join(f"{a} (l.{graph[a][b]})" for a, b in zip(cycle, cycle[1:], strict=False)) + \
        f" -> {cycle[-1]}"


def test_no_import_cycle_among_autometa_modules() -> None:
    graph = import_graph(ROOT / "autometa", "autometa")
    assert len(graph) > 60, sorted(graph)  # the whole package was read
    cycle = find_cycle(graph)
    assert not cycle, ("import cycle (every kind of import counts; move the concept to the "
                       f"module it belongs to, not the import into a function): "
                       f"{describe(cycle, graph)}")


def test_no_import_cycle_among_first_party_plugins() -> None:
    graph = import_graph(ROOT / "plugins", "autometa_plugins")
    cycle = find_cycle(graph)
    assert not cycle, f"import cycle: {describe(cycle, graph)}"


@pytest.mark.parametrize("where", [
    "import pkg.b  # at module level",
    "def f():\n    from pkg import b",
    "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.b import thing",
    "from . import b",
])
def test_the_cycle_finder_counts_every_kind_of_import(tmp_path: Path, where: str) -> None:
    """The check above can fail: a cycle made by each kind of import is found."""
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text(where + "\n")
    (package / "b.py").write_text("from pkg.c import x\n")
    (package / "c.py").write_text("def g():\n    import pkg.a\n")
    graph = import_graph(package, "pkg")
    assert find_cycle(graph) == ["pkg.a", "pkg.b", "pkg.c", "pkg.a"]
    (package / "c.py").write_text("x = 1\n")
    assert find_cycle(import_graph(package, "pkg")) == []


@pytest.mark.parametrize("folder", ["autometa", "plugins", "benchmarks"])
def test_no_module_is_past_the_line_limit(folder: str) -> None:
    long = {str(p.relative_to(ROOT)): n for p in sorted((ROOT / folder).rglob("*.py"))
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, (f"modules past {MAX_LINES} lines (usually two concepts: split them by "
                      f"concept): {long}")


def contract_layers() -> list[str]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    linter = config["tool"]["importlinter"]
    assert linter.get("exclude_type_checking_imports") is False  # those imports count
    (contract,) = [c for c in linter["contracts"] if c["type"] == "layers"]
    assert contract["containers"] == ["autometa"] and contract["exhaustive"] is True
    return [" ".join(layer.split()) for layer in contract["layers"]]


def test_the_layers_contract_matches_the_architecture_table() -> None:
    """ARCHITECTURE.md's table lists the contract's layers, top to bottom, each in the
    first column as the contract writes it (``a | b``: siblings that import neither
    each other)."""
    text = (ROOT / "ARCHITECTURE.md").read_text(encoding="utf-8")
    table = text.split("## Layers", 1)[1].split("\n## ", 1)[0]
    rows = [" ".join(m.group(1).replace("\\|", "|").split())
            for m in re.finditer(r"^\|\s*`([^`]+)`\s*\|", table, re.M)]
    assert rows == contract_layers(), ("the layers contract in pyproject.toml and the "
                                       "table in ARCHITECTURE.md differ: edit both")


def test_every_autometa_module_is_in_a_layer() -> None:
    """What lint-imports' exhaustive contract checks too, with a message naming the fix."""
    named = {part.strip() for layer in contract_layers() for part in layer.split("|")}
    top = {name.split(".")[1] for name in modules(ROOT / "autometa", "autometa")
           if name.count(".") >= 1}
    assert top - named == set(), "add these to a layer in pyproject.toml and ARCHITECTURE.md"
