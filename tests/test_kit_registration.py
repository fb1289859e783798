"""check_plugin: a plugin's hooks and registrations checked as the host loads them."""

from __future__ import annotations

import importlib
import re
import sys
import textwrap
import types
import warnings
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import pytest

import autometa
from autometa import Float
from autometa.plugins import DISTRIBUTION, KINDS
from autometa.testing import NameClashWarning, check_plugin
from autometa_plugins.sinusoid.task import Sinusoid

FIRST_PARTY = sorted((ep for ep in entry_points(group="autometa")
                      if ep.dist is not None and ep.dist.metadata["Name"] == DISTRIBUTION),
                     key=lambda ep: ep.name)
#: Kinds other than the three contracts (pruners, samplers...): their factories must load a
#: callable, nothing more. Read from KINDS: kinds are added over time.
OTHER_KINDS = [k for k in KINDS if k not in ("task", "source", "algorithm")]


def plugin(**hooks: Any) -> types.SimpleNamespace:
    """An in-process plugin whose attributes are hook implementations."""
    return types.SimpleNamespace(**{k: autometa.hookimpl(v) for k, v in hooks.items()})


def registering(hook: str, name: str, factory: Any) -> types.SimpleNamespace:
    def register_one(register):  # registering hook
        register(name, factory)

    return plugin(**{hook: register_one})


def line_of(marker: str) -> int:
    """Line number of the line of this file that ends with ``# <marker>``."""
    lines = Path(__file__).read_text().splitlines()
    return next(i for i, text in enumerate(lines, 1) if text.endswith(f"# {marker}"))


def at(marker: str, file: str = Path(__file__).name, line: int | None = None) -> str:
    """A pattern for ``file:line`` (of the marked line of this file), whatever the folder."""
    return rf"(?:\S*/)?{re.escape(file)}:{line_of(marker) if line is None else line}"


@pytest.mark.parametrize("ep", FIRST_PARTY, ids=[ep.name for ep in FIRST_PARTY])
def test_every_first_party_plugin_passes(ep: Any) -> None:
    with warnings.catch_warnings():  # its own names are no clash
        warnings.simplefilter("error", NameClashWarning)
        info = check_plugin(ep.load(), name=ep.name)
    assert info.provides and all(isinstance(r.factory, str) for r in info.provides)


def test_a_class_registered_instead_of_a_string_is_refused() -> None:
    with pytest.raises(AssertionError) as failed:
        check_plugin(registering("register_tasks", "sine", Sinusoid), name="eager")
    assert re.fullmatch(
        rf"task 'sine' of plugin 'eager' \(register_tasks, {at('registering hook')}\) is "
        r"registered as the object <class '.*Sinusoid'>; register "
        r'"autometa_plugins\.sinusoid\.task:Sinusoid" so that `autometa plugins` and '
        r"`--help` import nothing heavy", str(failed.value))


def test_an_entry_named_like_a_first_party_one_is_a_warning_naming_it_and_the_fix() -> None:
    def register_meta_algorithms(register):  # takes maml
        register("maml", "autometa_plugins.maml.algorithm:MAML")
        register("my-reptile", "autometa_plugins.reptile.algorithm:Reptile")

    with pytest.warns(NameClashWarning) as caught:
        info = check_plugin(plugin(register_meta_algorithms=register_meta_algorithms),
                            name="my-maml")
    assert [r.name for r in info.provides] == ["maml", "my-reptile"]  # a warning, no failure
    (warned,) = caught
    assert re.fullmatch(
        rf"meta-algorithm 'maml' of plugin 'my-maml' \(register_meta_algorithms, "
        rf"{at('takes maml')}\) has the name of autometa's first-party meta-algorithm 'maml' "
        r"\(plugin 'maml', autometa-ml 0\.1\.0\), which every install of autometa has: both "
        r"are unusable until a user disables one; register yours under a name of its own",
        str(warned.message)), warned.message
    assert warned.filename == __file__  # it points at the check's caller


def test_an_entry_point_named_like_a_first_party_one_is_a_warning() -> None:
    with pytest.warns(NameClashWarning) as caught:
        check_plugin(registering("register_source_models", "wide-mlp",
                                 "autometa_plugins.mlp.model:MLP"), name="mlp")
    assert [str(w.message) for w in caught] == [
        "plugin 'mlp': its entry-point name 'mlp' is that of autometa's first-party plugin "
        "'mlp' (autometa-ml 0.1.0), which every install of autometa has: neither is loaded "
        "until a user disables one; rename your entry point (pyproject.toml, "
        "[project.entry-points.autometa])"]


def test_a_first_party_name_of_another_kind_is_no_clash() -> None:
    """A task `maml` is not the meta-algorithm `maml`: `--task maml` and `--algorithms maml`
    never meet, and the host keeps one table per kind."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", NameClashWarning)
        check_plugin(registering("register_tasks", "maml",
                                 "autometa_plugins.sinusoid.task:Sinusoid"), name="tasks")


def test_a_misspelled_hook_is_named_with_the_closest_one() -> None:
    def register_task(register):  # misspelled
        register("sine", "autometa_plugins.sinusoid.task:Sinusoid")

    with pytest.raises(AssertionError, match=(
            rf"^plugin 'typo': hook register_task \({at('misspelled')}\) matches no "
            r"specification \(did you mean 'register_tasks'\?\); hooks are ")):
        check_plugin(plugin(register_task=register_task), name="typo")


def test_a_lifecycle_hook_asking_for_an_argument_its_hook_does_not_pass_is_named() -> None:
    def search_finished(study, board):
        pass

    with pytest.raises(AssertionError, match=r"hook search_finished \(.*\) takes 'study', "
                       r"'board', which search_finished does not pass; it passes study_name"):
        check_plugin(plugin(search_finished=search_finished), name="sig")


def test_a_lifecycle_only_plugin_passes_and_an_empty_one_fails() -> None:
    def search_finished(leaderboard):
        pass

    assert check_plugin(plugin(search_finished=search_finished), name="reporter").provides == []
    with pytest.raises(AssertionError, match="'empty' registers nothing and implements no "
                       "lifecycle hook; implement one of register_tasks"):
        check_plugin(types.SimpleNamespace(), name="empty")


def test_a_registration_hook_that_raises_is_named_with_its_line() -> None:
    def register_tasks(register):
        register("sine", "autometa_plugins.sinusoid.task:Sinusoid")
        raise RuntimeError("boom")  # raises

    with pytest.raises(AssertionError, match=(
            rf"^plugin 'bad' is broken \(its hook register_tasks raised at {at('raises')}\): "
            "registration hook failed: RuntimeError: boom$")):
        check_plugin(plugin(register_tasks=register_tasks), name="bad")


def test_a_string_that_does_not_load_is_named() -> None:
    with pytest.raises(AssertionError, match=r"meta-algorithm 'ghost' of plugin 'p' .* does "
                       r"not load: .*'nowhere.at.all:Ghost'.*ModuleNotFoundError"):
        check_plugin(registering("register_meta_algorithms", "ghost", "nowhere.at.all:Ghost"),
                     name="p")


def test_a_class_of_another_kind_is_refused() -> None:
    with pytest.raises(AssertionError, match=r"task 'mlp' .*'autometa_plugins.mlp.model:MLP' "
                       r"is MLP \(.*mlp/model.py:\d+\), not a subclass of autometa.Task"):
        check_plugin(registering("register_tasks", "mlp", "autometa_plugins.mlp.model:MLP"),
                     name="p")


class OddSinusoid(Sinusoid):  # OddSinusoid
    params = {"shots": Float(50.0, 60.0)}


def test_a_declared_range_that_excludes_the_default_is_refused() -> None:
    with pytest.raises(AssertionError, match=(
            rf"^OddSinusoid \({at('OddSinusoid')}\): shots: default 10 is outside "
            r"\[50.0, 60.0\]$")):
        check_plugin(registering("register_tasks", "odd", f"{__name__}:OddSinusoid"),
                     name="p")


@pytest.mark.skipif(not OTHER_KINDS, reason="only the three contract kinds exist")
@pytest.mark.parametrize("kind", OTHER_KINDS)
def test_another_kind_must_load_a_callable(kind: str) -> None:
    hook = KINDS[kind][0]
    check_plugin(registering(hook, "joined", "os.path:join"), name="p")
    with pytest.raises(AssertionError, match=r"'os:sep' is a str, not a callable"):
        check_plugin(registering(hook, "sep", "os:sep"), name="p")


# -- no torch at registration: a fresh interpreter imports the plugin and registers it -------
HOOK = """
from autometa import hookimpl


@hookimpl
def register_meta_algorithms(register):
    {body}register("x", "{module}_impl:Algorithm")
"""


def write_plugin(root: Path, module: str, *, top: str = "", body: str = "") -> types.ModuleType:
    """``root/module.py``: a plugin whose algorithm lives in ``module_impl`` (imports torch)."""
    (root / f"{module}.py").write_text(textwrap.dedent(top) + HOOK.format(module=module,
                                                                            body=body))
    (root / f"{module}_impl.py").write_text(textwrap.dedent("""
        import torch
        from autometa_plugins.maml.algorithm import MAML as Algorithm
        """))
    return importlib.import_module(module)


@pytest.fixture
def plugin_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_a_plugin_that_imports_torch_lazily_passes(plugin_dir: Path) -> None:
    check_plugin(write_plugin(plugin_dir, "kit_lazy_plugin"), name="lazy")


def test_a_plugin_importing_torch_at_top_level_is_refused(plugin_dir: Path) -> None:
    module = write_plugin(plugin_dir, "kit_heavy_plugin",
                          top='"""A plugin that imports torch."""\nimport torch\n')
    with pytest.raises(AssertionError) as failed:
        check_plugin(module, name="heavy")
    assert re.fullmatch(
        rf"plugin 'heavy' \(kit_heavy_plugin, {at('', 'kit_heavy_plugin.py', 1)}\): importing "
        r"'kit_heavy_plugin' or registering it imported torch \(importing it: "
        rf"{at('', 'kit_heavy_plugin.py', 2)} `import torch`\); move torch imports into the "
        r"module named by the 'module:attr' string, so that `autometa plugins` and `--help` "
        "import nothing heavy", str(failed.value))


def test_a_registration_hook_importing_torch_through_a_helper_is_refused(
        plugin_dir: Path) -> None:
    (plugin_dir / "kit_helper.py").write_text("from torch import nn\n")
    module = write_plugin(plugin_dir, "kit_hooked_plugin", body="import kit_helper\n    ")
    with pytest.raises(AssertionError, match=(
            rf"\(registering it: {at('', 'kit_hooked_plugin.py', 7)} `import kit_helper` -> "
            rf"{at('', 'kit_helper.py', 1)} `from torch import nn`\)")):
        check_plugin(module, name="hooked")


def test_a_private_autometa_import_in_the_package_fails_check_plugin(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    package = tmp_path / "kit_private_pkg"
    package.mkdir()
    (package / "__init__.py").write_text(
        "import autometa\n\n@autometa.hookimpl\ndef register_meta_algorithms(register):\n"
        "    register('priv', 'kit_private_pkg.algo:Algo')\n")
    (package / "algo.py").write_text(
        "from autometa.engine.run import search\n"
        "from autometa.inner_loop import _lr\n"
        "from autometa import MetaAlgorithm\n\n"
        "class Algo(MetaAlgorithm):\n"
        "    def meta_step(self, batch):\n        return 0.0\n\n"
        "    def adapt_and_predict(self, episodes):\n        return episodes.query_y\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import kit_private_pkg  # type: ignore[import-not-found]

    with pytest.raises(AssertionError, match=r"(?s)beyond autometa's public API.*algo\.py:1: "
                                             r"imports autometa\.engine\.run.*algo\.py:2: "
                                             r"'from autometa\.inner_loop import _lr'"):
        check_plugin(kit_private_pkg, name="priv")
    sys.modules.pop("kit_private_pkg", None)
