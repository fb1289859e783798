"""``autometa new-plugin``: a plugin package to start from, with its entry point and tests.

The templates are files under ``autometa/templates/`` (``common/`` for every kind, then
one folder per kind), filled with :class:`string.Template` (``$name``, ``$package``...);
a path segment ``PACKAGE`` becomes the package's name, a ``dot-`` prefix a ``.`` (package
data globs skip dot-files) and a ``.tmpl`` suffix is dropped.
Each package is what a first-party plugin looks like: hooks in ``__init__.py`` that
register a ``"module:attr"`` string, the class in its own module, tests that run the
conformance kit (``autometa.testing``) and a tiny search through the pytest fixtures.
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path
from string import Template

from autometa.errors import ConfigError
from autometa.plugins import DISTRIBUTION

__all__ = ["TEMPLATE_KINDS", "new_plugin"]

#: What ``--kind`` accepts -> a one-line summary of the package it makes.
TEMPLATE_KINDS = {
    "task": "a few-shot classification task over synthetic Gaussian blobs",
    "source": "a source model: an MLP with LayerNorm",
    "algorithm": "a gradient-based meta-algorithm: BOIL's body-only inner loop",
    "reporter": "a reporter: every lifecycle event as one JSON line",
}
#: A plugin's name: what it registers and its entry point (``autometa plugins`` lists it).
NAME = re.compile(r"[a-z][a-z0-9]*(?:-[a-z0-9]+)*")


def new_plugin(name: str, kind: str, parent: str | Path = ".") -> Path:
    """Write the package ``autometa-<name>`` of ``kind`` into ``parent``; returns its folder.

    Raises:
        ConfigError: ``name`` is not lowercase letters, digits and single dashes starting
            with a letter, or it makes autometa's own distribution name; ``kind`` is not
            one of :data:`TEMPLATE_KINDS`; the folder exists already, or ``parent`` is not
            a writable directory. Nothing is written.
    """
    from autometa.config import check_writable_dir
    from autometa.version import __version__

    if kind not in TEMPLATE_KINDS:
        raise ConfigError(f"--kind {kind!r}: expected one of {', '.join(TEMPLATE_KINDS)}")
    if not NAME.fullmatch(name) or len(name) > 60:
        raise ConfigError(f"plugin name {name!r}: use lowercase letters, digits and single "
                          "dashes, starting with a letter (e.g. my-task); it names the entry "
                          "point and what the plugin registers")
    if f"autometa-{name}" == DISTRIBUTION:
        raise ConfigError(f"plugin name {name!r}: its distribution would be autometa-{name}, "
                          "which is autometa's own; choose another name")
    parent = Path(parent)
    check_writable_dir(parent, "--dir")
    root = parent / f"autometa-{name}"
    if root.exists() or root.is_symlink():
        raise ConfigError(f"{str(root)!r} exists already; choose another name or --dir")
    major, minor = (int(p) for p in __version__.split(".")[:2])
    values = {
        "name": name,
        "kind": kind,
        "dist": f"autometa-{name}",
        "host": DISTRIBUTION,  # what the plugin requires: autometa's distribution
        "package": "autometa_" + name.replace("-", "_"),
        "cls": "".join(part.capitalize() for part in name.split("-")),
        "summary": TEMPLATE_KINDS[kind],
        "version": __version__,
        # The public API is stable within a minor series before 1.0 (README, Public API).
        "next": f"{major + 1}" if major else f"0.{minor + 1}",
    }
    files = {**_templates("common"), **_templates(kind)}
    written: dict[Path, str] = {}
    for relative, text in files.items():
        relative = relative.replace("PACKAGE", values["package"]).removesuffix(".tmpl")
        target = root / "/".join("." + part[4:] if part.startswith("dot-") else part
                                 for part in relative.split("/"))
        try:
            written[target] = Template(text).substitute(values)
        except (KeyError, ValueError) as exc:  # a template bug, not the user's
            raise RuntimeError(f"template {kind}/{relative}: {exc}") from exc
    for target, text in written.items():
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text, encoding="utf-8")
    return root


def _templates(folder: str) -> dict[str, str]:
    """``{relative path: text}`` of the template files under ``templates/<folder>``."""
    base = resources.files("autometa") / "templates" / folder
    out: dict[str, str] = {}

    def walk(node: object, prefix: str) -> None:
        for child in node.iterdir():  # type: ignore[attr-defined]
            path = f"{prefix}{child.name}"
            if child.is_dir():
                if child.name != "__pycache__":
                    walk(child, path + "/")
            else:
                out[path] = child.read_text(encoding="utf-8")

    walk(base, "")
    return out
