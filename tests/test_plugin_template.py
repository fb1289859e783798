"""`autometa new-plugin`: the packages it writes install (non-editable, in a fresh venv
beside a non-editable autometa), pass their own tests, and are listed, searched and ranked."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
from limits import PLUGIN_TEMPLATE_STEP
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import autometa
from autometa.cli import main
from autometa.config import tomllib
from autometa.plugins import DISTRIBUTION

REPO = Path(__file__).resolve().parents[1]
#: One plugin of each kind: (name, --kind).
KINDS = (("blobs", "task"), ("wide-mlp", "source"), ("boil", "algorithm"),
         ("jsonl-log", "reporter"))
#: What the copy of the repository that pip builds leaves out (not part of the package).
NOT_PACKAGED = shutil.ignore_patterns(".git", ".venv", "__pycache__", "*.egg-info", "build",
                                      "tests", "benchmarks", "examples", "*.db",
                                      "autometa-artifacts", "autometa-reports", ".ruff_cache",
                                      ".mypy_cache", ".pytest_cache")


def test_every_package_is_in_the_distribution() -> None:
    """A package missing from pyproject's list works editable and is absent from a wheel."""
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setuptools["packages"])
    found = {".".join(p.parent.relative_to(REPO).parts).replace("plugins", "autometa_plugins", 1)
             for top in ("autometa", "plugins") for p in (REPO / top).rglob("__init__.py")
             if "templates" not in p.parts}
    assert found <= listed, f"add to [tool.setuptools] packages: {sorted(found - listed)}"


def test_the_distribution_is_named_as_the_host_knows_it() -> None:
    """pyproject's [project] name is DISTRIBUTION (the first-party plugins' distribution,
    what the templates require); "autometa" on the package index is another project."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["name"] == DISTRIBUTION != "autometa"
    assert version(DISTRIBUTION) == autometa.__version__
    assert set(project["scripts"]) == {"autometa"} and "autometa" in project["entry-points"]


@pytest.mark.parametrize("argv, words", [
    (["Bad_Name", "--kind", "task"], "lowercase letters"),
    (["ok-name", "--kind", "task", "--dir", "{d}/a-file"], "--dir"),
    (["exists", "--kind", "source"], "exists already"),
    (["protonet", "--kind", "algorithm"], "installed already"),
    (["ml", "--kind", "task"], "autometa-ml, which is autometa's own"),
])
def test_new_plugin_refuses_bad_input_and_writes_nothing(
        argv: list[str], words: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "autometa-exists").mkdir()
    (tmp_path / "a-file").write_text("x")
    before = sorted(tmp_path.rglob("*"))
    argv = [a.replace("{d}", str(tmp_path)) for a in argv]
    assert main(["new-plugin", *argv, *([] if "--dir" in argv else ["--dir", str(tmp_path)])]
                ) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and words in err, err
    assert sorted(tmp_path.rglob("*")) == before


def test_each_kind_writes_a_package_with_its_entry_point(tmp_path: Path) -> None:
    for name, kind in KINDS:
        assert main(["new-plugin", name, "--kind", kind, "--dir", str(tmp_path)]) == 0
        root = tmp_path / f"autometa-{name}"
        project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
        package = "autometa_" + name.replace("-", "_")
        assert project["entry-points"]["autometa"] == {name: package}
        assert (root / "src" / package / "__init__.py").is_file()
        assert (root / ".gitignore").is_file()
        # No template placeholder left, and the code compiles.
        for path in root.rglob("*"):
            if path.is_file():
                text = path.read_text()
                assert not re.search(r"\$[a-z]", text), path
                if path.suffix == ".py":
                    compile(text, str(path), "exec")


def test_a_generated_plugin_requires_autometas_own_distribution(tmp_path: Path) -> None:
    """Its one requirement is DISTRIBUTION in this minor series, never "autometa" (another
    project on the package index, which pip would install), and no file links to that
    project's page."""
    assert main(["new-plugin", "blobs", "--kind", "task", "--dir", str(tmp_path)]) == 0
    root = tmp_path / "autometa-blobs"
    (requirement,) = map(Requirement, tomllib.loads((root / "pyproject.toml").read_text())
                         ["project"]["dependencies"])
    assert canonicalize_name(requirement.name) == DISTRIBUTION == "autometa-ml"
    assert autometa.__version__ in requirement.specifier
    assert "0.2.0" not in requirement.specifier  # pinned to the minor series (before 1.0)
    texts = {path.name: path.read_text() for path in root.rglob("*") if path.is_file()}
    assert f"https://pypi.org/project/{DISTRIBUTION}/" in texts["README.md"]
    for name, text in texts.items():
        assert "pypi.org/project/autometa/" not in text, name
        assert not re.search(r"""["']autometa\s*[<>=~!\[]""", text), name  # no "autometa>=..."


@pytest.mark.slow  # a fresh venv, pip-installing autometa and four plugins, their tests, a search
def test_generated_plugins_in_a_fresh_venv_pass_their_tests_and_are_searched(
        tmp_path: Path) -> None:
    """The README's promise for plugin authors, as CI checks it: four packages from the
    template, installed non-editable with a non-editable autometa in a new venv."""
    for name, kind in KINDS:
        assert main(["new-plugin", name, "--kind", kind, "--dir", str(tmp_path)]) == 0
    source = tmp_path / "autometa-source"
    shutil.copytree(REPO, source, ignore=NOT_PACKAGED)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True,
                   timeout=PLUGIN_TEMPLATE_STEP)
    python = venv / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"

    def run(*argv: str | Path, cwd: Path = tmp_path, timeout: int = PLUGIN_TEMPLATE_STEP
            ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([str(a) for a in argv], cwd=cwd, env=env, text=True,
                                capture_output=True, timeout=timeout)
        assert result.returncode == 0, (f"{' '.join(map(str, argv))} exited "
                                        f"{result.returncode}:\n{result.stdout[-3000:]}\n"
                                        f"{result.stderr[-3000:]}")
        return result

    # The pinned set as constraints: the CPU torch from local disk, the versions CI tests.
    run(python, "-m", "pip", "install", "-q", "-c", REPO / "requirements-dev.txt", source,
        *(tmp_path / f"autometa-{name}" for name, _ in KINDS), "pytest")
    # The plugins' requirement was met by this autometa, not by the index's other "autometa".
    installed = {canonicalize_name(d["name"]) for d in json.loads(
        run(python, "-m", "pip", "list", "--format=json").stdout)}
    assert DISTRIBUTION in installed and "autometa" not in installed, sorted(installed)

    # Each package's own tests, in one run (one interpreter start-up instead of four).
    tests = run(python, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                *(tmp_path / f"autometa-{name}" / "tests" for name, _ in KINDS))
    written = sum(f.read_text().count("\ndef test_") for name, _ in KINDS
                  for f in (tmp_path / f"autometa-{name}" / "tests").glob("test_*.py"))
    assert f"{written} passed" in tests.stdout, tests.stdout[-500:]

    listing = json.loads(run(venv / "bin" / "autometa", "plugins", "--json").stdout)
    plugins = {p["name"]: p for p in listing["plugins"]}
    for name, _ in KINDS:
        assert plugins[name]["status"] == "ok", plugins[name]
        assert plugins[name]["distribution"] == f"autometa-{name}"
    assert plugins["boil"]["kinds"] == ["algorithm"]
    assert plugins["jsonl-log"]["hooks"], "the reporter's lifecycle hooks are not listed"

    work = tmp_path / "work"
    work.mkdir()
    run(venv / "bin" / "autometa", "run", "--task", "blobs", "--algorithms", "boil,maml",
        "--sources", "wide-mlp", "--trials", "3", "--meta-steps", "20", "--eval-every", "10",
        "--task-param", "val_episodes=8", "--task-param", "test_episodes=8",
        "--pruner", "none", "--no-baselines", "--plugin-option", "jsonl-log.path=events.jsonl",
        "--no-progress",
        cwd=work)
    with (work / "autometa-reports" / "blobs-seed0.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert {r["algorithm"] for r in rows} == {"boil", "maml"}  # the portfolio ran both
    assert {r["source"] for r in rows} == {"wide-mlp"}
    events = [json.loads(line)["event"] for line in (work / "events.jsonl").open()]
    assert events[0] == "search_started" and events[-1] == "search_finished"
    assert events.count("trial_finished") == 3
