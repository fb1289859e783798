"""A worker joining a study, and a resuming run, run the code the study was made with
(issue 25, "Workers and studies agree"): a third-party plugin is installed as a real
distribution (a dist-info directory on PYTHONPATH) at 1.0.0, a study is made with it, the
plugin is then "upgraded" in place, and `autometa worker` / `autometa run` are run as users
run them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Literal

import optuna
import pytest
from limits import CLI_SEARCH, QUICK_SUBPROCESS
from packaging.requirements import Requirement

import autometa
from autometa import Categorical, ConfigError, Float, create_host, hookimpl
from autometa.plugins import DISTRIBUTION
from autometa.space import to_json
from autometa.study.agreement import check_agreement, difference, requirements
from autometa.version import __version__

DIST = "autometa-tiny"

HOOK = """
    import autometa

    @autometa.hookimpl
    def register_meta_algorithms(register):
        register("tiny", "tiny_algorithm:Tiny", description="Reptile with a knob")
"""

#: Version 1.0.0 (and its patch 1.0.1): a hyperparameter ``boost``.
WITH_BOOST = """
    from autometa import Float
    from autometa_plugins.reptile.algorithm import Reptile

    class Tiny(Reptile):
        def __init__(self, model, task, *, inner_lr: float = 0.02, boost: float = 1.0):
            super().__init__(model, task, inner_lr=inner_lr * boost, inner_steps=2,
                             meta_batch_size=2, eval_steps=2)

        @classmethod
        def search_space(cls):
            return {"inner_lr": Float(0.005, 0.05, log=True), "boost": Float(0.5, 1.0)}
"""

#: Version 1.1.0 as its author rewrote it: ``boost`` is gone.
WITHOUT_BOOST = """
    from autometa import Float
    from autometa_plugins.reptile.algorithm import Reptile

    class Tiny(Reptile):
        def __init__(self, model, task, *, inner_lr: float = 0.02):
            super().__init__(model, task, inner_lr=inner_lr, inner_steps=2,
                             meta_batch_size=2, eval_steps=2)

        @classmethod
        def search_space(cls):
            return {"inner_lr": Float(0.005, 0.05, log=True)}
"""

SEARCH = ["--task", "sinusoid", "--algorithms", "tiny", "--sources", "mlp", "--meta-steps",
          "2", "--eval-every", "2", "--top-k", "1", "--task-param", "val_episodes=4",
          "--task-param", "test_episodes=4", "--task-param", "eval_queries=5",
          "--storage", "sqlite:///a.db", "--study", "s", "--artifacts", "art", "--no-progress"]
#: ``autometa worker`` on the same machine: the artifact store as this machine reaches it,
#: and a timeout of its own (without one, it would take the creating run's).
WORKER = ["worker", "s", "--storage", "sqlite:///a.db", "--artifacts", "art", "--timeout",
          "3600", "--no-progress"]


def install(site: Path, version: str, algorithm: str) -> None:
    """Install (or replace) distribution ``autometa-tiny`` at ``version`` into ``site``."""
    for old in site.glob("autometa_tiny-*.dist-info"):
        shutil.rmtree(old)
    info = site / f"autometa_tiny-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {DIST}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text("[autometa]\ntiny = tiny_plugin\n")
    (site / "tiny_plugin.py").write_text(textwrap.dedent(HOOK))
    (site / "tiny_algorithm.py").write_text(textwrap.dedent(algorithm))


def cli(tmp_path: Path, *args: str, limit: int = CLI_SEARCH) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("AUTOMETA_") or k == "AUTOMETA_CACHE_DIR"}
    env.update(PYTHONPATH=str(tmp_path / "site"), COLUMNS="200")
    return subprocess.run([sys.executable, "-m", "autometa", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=limit)


def trials(tmp_path: Path) -> list[tuple[int, str, dict[str, Any]]]:
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / 'a.db'}")
    return [(t.number, t.state.name, t.params) for t in study.trials]


@pytest.fixture
def made(tmp_path: Path) -> Path:
    """Study ``s`` made with autometa-tiny 1.0.0 on "machine A": its budget of 3 trials is
    left to the workers (the run stops starting trials at once), its portfolio trial
    queued."""
    install(tmp_path / "site", "1.0.0", WITH_BOOST)
    result = cli(tmp_path, "run", *SEARCH, "--trials", "3", "--timeout", "0.001")
    assert result.returncode == 0, result.stderr
    assert [state for _, state, _ in trials(tmp_path)] == ["WAITING"]
    return tmp_path


def test_a_worker_whose_plugin_lacks_a_stored_hyperparameter_is_refused(made: Path) -> None:
    """Before: every trial failed with "unexpected keyword argument 'boost'"."""
    before = trials(made)
    install(made / "site", "1.1.0", WITHOUT_BOOST)
    result = cli(made, *WORKER)
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.splitlines()
    assert line == (
        "autometa: error: study 's' was made with algorithm 'tiny' from autometa-tiny 1.0.0 "
        "whose space has 'boost'; the installed 'tiny' (autometa-tiny 1.1.0) does not accept "
        "'boost'; install autometa-tiny==1.0.0 on this machine (pip install "
        "'autometa-tiny==1.0.0'), or start a new study")
    assert trials(made) == before  # nothing claimed, nothing failed
    check = cli(made, "requirements", "s", "--storage", "sqlite:///a.db", "--check",
                limit=QUICK_SUBPROCESS)
    assert (check.returncode, check.stderr, check.stdout) == (2, result.stderr, "")


def test_another_minor_version_is_refused_even_with_the_same_space(made: Path) -> None:
    before = trials(made)
    install(made / "site", "1.1.0", WITH_BOOST)
    result = cli(made, *WORKER)
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [
        "autometa: error: study 's' was made with autometa-tiny 1.0.0; this machine has "
        "autometa-tiny 1.1.0 (another major or minor version); install autometa-tiny==1.0.0 "
        "on this machine (pip install 'autometa-tiny==1.0.0'), or start a new study"]
    assert trials(made) == before


def test_a_patch_release_is_one_warning_and_the_worker_runs(made: Path) -> None:
    install(made / "site", "1.0.1", WITH_BOOST)
    check = cli(made, "requirements", "s", "--storage", "sqlite:///a.db", "--check",
                limit=QUICK_SUBPROCESS)
    assert check.returncode == 0, check.stderr
    assert check.stdout == (f"this machine agrees with study 's' ({DISTRIBUTION}=={__version__}, "
                            f"{DIST}==1.0.0)\n")
    warning = ("WARNING autometa.study.agreement: study 's' was made with autometa-tiny 1.0.0; "
               "this machine has 1.0.1 (the same 1.0 series: allowed, results should agree; "
               "pin autometa-tiny==1.0.0 for identical code)")
    assert check.stderr.splitlines() == [warning]
    result = cli(made, *WORKER, "--workers", "2")  # the pool's processes do not repeat it
    assert result.returncode == 0, result.stderr
    assert [line for line in result.stderr.splitlines() if "1.0.1" in line] == [warning]
    assert [state for _, state, _ in trials(made)] == ["COMPLETE"] * 3


def test_a_resuming_run_is_refused_too(tmp_path: Path) -> None:
    install(tmp_path / "site", "1.0.0", WITH_BOOST)
    first = cli(tmp_path, "run", *SEARCH, "--trials", "1")
    assert first.returncode == 0, first.stderr
    before = trials(tmp_path)
    assert [state for _, state, _ in before] == ["COMPLETE"]
    install(tmp_path / "site", "1.1.0", WITHOUT_BOOST)
    result = cli(tmp_path, "run", *SEARCH, "--trials", "3")
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.splitlines()
    assert "does not accept 'boost'" in line and "autometa-tiny==1.0.0" in line
    assert trials(tmp_path) == before


def test_requirements_is_a_pip_file_of_the_studys_versions(made: Path) -> None:
    result = cli(made, "requirements", "s", "--storage", "sqlite:///a.db",
                 limit=QUICK_SUBPROCESS)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("#")
    pins = [Requirement(line) for line in lines if not line.startswith("#")]
    assert [(r.name, str(r.specifier)) for r in pins] == [
        (DISTRIBUTION, f"=={__version__}"), (DIST, "==1.0.0")]
    # A machine without the plugin at all: refused, naming what to install.
    shutil.rmtree(made / "site")
    (made / "site").mkdir()
    check = cli(made, "requirements", "s", "--storage", "sqlite:///a.db", "--check",
                limit=QUICK_SUBPROCESS)
    assert check.returncode == 2
    (line,) = check.stderr.splitlines()
    assert "searched algorithm 'tiny', which is not usable now" in line
    assert "install autometa-tiny==1.0.0 on this machine" in line


@pytest.mark.parametrize("made_with, here, level", [
    ("1.0.0", "1.0.0", "same"), ("1.0", "1.0.0", "same"),
    ("1.0.0", "1.0.1", "patch"), ("1.0.3", "1.0.0", "patch"),
    ("1.0.0", "1.0.0.post1", "patch"), ("1.0.0", "1.0.0+cu121", "patch"),
    ("1.0.0", "1.1.0", "other"), ("1.0.0", "2.0.0", "other"), ("0.1.0", "0.2.0", "other"),
    ("1.1.0rc1", "1.1.0", "other"), ("1.1.0.dev3", "1.1.0.dev4", "other"),
    ("1.0.0", "1.0.1.dev0", "other"), ("abc", "abd", "other"), ("abc", "abc", "same"),
])
def test_the_version_rule(made_with: str, here: str, level: str) -> None:
    assert difference(made_with, here) == level


Mode = Literal["a", "b"]


class _WithKnob:
    def __init__(self, model: Any, task: Any, *, lr: float = 0.1, knob: float = 1.0,
                 mode: Mode = "a") -> None:
        pass


class _WithoutKnob:
    def __init__(self, model: Any, task: Any, *, lr: float = 0.1, mode: Mode = "a") -> None:
        pass


class _FewerModes:
    def __init__(self, model: Any, task: Any, *, lr: float = 0.1, knob: float = 1.0,
                 mode: Literal["a"] = "a") -> None:
        pass


class _Knob:
    """An in-process plugin (no distribution) registering ``algorithm`` as knob-algo."""

    def __init__(self, algorithm: type) -> None:
        self.algorithm = algorithm

    @hookimpl
    def register_meta_algorithms(self, register: Any) -> None:
        register("knob-algo", self.algorithm)


def _host(algorithm: type) -> autometa.PluginHost:
    return create_host(entry_points=False, plugins={"knob": _Knob(algorithm)})


def _stored(space: dict[str, Any], autometa_version: str = __version__) -> dict[str, Any]:
    return {"autometa_version": autometa_version,
            "plugins": {"algorithm": {"knob-algo": "knob (in-process)"}},
            "spaces": {"algorithm": {"knob-algo": to_json(space)}}}


def test_an_in_process_plugin_is_compared_by_its_space_only() -> None:
    space = {"lr": Float(0.01, 0.1), "knob": 2.0, "mode": Categorical(("a", "b"))}
    assert check_agreement(_stored(space), _host(_WithKnob), "s") == []
    assert requirements(_stored(space)) == [
        f"{DISTRIBUTION}=={__version__}",
        "# registered by code, not installed by pip: algorithm 'knob-algo' of plugin 'knob'"]
    without = _host(_WithoutKnob)
    with pytest.raises(ConfigError, match="whose space has 'knob'; the installed 'knob-algo' "
                                          r"\(in-process\) does not accept 'knob'; register"):
        check_agreement(_stored(space), without, "s")
    narrower = _host(_FewerModes)
    with pytest.raises(ConfigError, match="whose space has 'mode' = 'b'; the installed "
                                          r"'knob-algo' \(in-process\) does not accept it"):
        check_agreement(_stored(space), narrower, "s")


def test_autometa_itself_is_compared() -> None:
    host = _host(_WithKnob)
    space = {"lr": Float(0.01, 0.1)}
    major, minor, *_ = __version__.split(".")
    with pytest.raises(ConfigError, match=rf"made with autometa-ml {major}\.{int(minor) + 1}\.0;"
                                          rf" this machine has autometa-ml {__version__} "):
        check_agreement(_stored(space, f"{major}.{int(minor) + 1}.0"), host, "s")
    (note,) = check_agreement(_stored(space, f"{major}.{minor}.99"), host, "s")
    assert f"this machine has {__version__} (the same {major}.{minor} series" in note


def test_no_installed_plugin_disagrees_with_its_own_declared_space() -> None:
    """No false alarm: every first-party algorithm's and source's declared space, stored as
    a study stores it, agrees with the plugin that declared it."""
    host = autometa.create_host()
    stored: dict[str, Any] = {"autometa_version": __version__, "plugins": {}, "spaces": {}}
    for kind in ("algorithm", "source"):
        for name in host.names(kind):
            reg = host.get(kind, name)
            try:
                declared = reg.declared()
            except autometa.PluginError:  # an optional library missing (timm, ...)
                continue
            stored["spaces"].setdefault(kind, {})[name] = to_json(declared)
            stored["plugins"].setdefault(kind, {})[name] = f"{reg.distribution} {reg.version}"
    assert len(stored["spaces"]["algorithm"]) >= 8
    assert check_agreement(stored, host, "s") == []
    assert requirements(stored) == [f"{DISTRIBUTION}=={__version__}"]
