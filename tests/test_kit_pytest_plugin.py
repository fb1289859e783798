"""The pytest plugin a plugin author gets with autometa: its fixtures in a real pytest run on a
generated test suite, and failures that show the plugin's code, not the kit's."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from limits import QUICK_SUBPROCESS

pytest_plugins = ["pytester"]

#: A plugin author's package: hooks (no torch), the algorithm in its own module.
PLUGIN = '''
from autometa import hookimpl


@hookimpl
def register_meta_algorithms(register):
    register("direct", "author_algorithm:Direct")
'''

ALGORITHM = '''
import torch

from autometa import MetaAlgorithm


class Direct(MetaAlgorithm):
    """Predicts the query points with the network itself."""

    def __init__(self, model, task, lr: float = 0.01) -> None:
        super().__init__(model, task)
        self.optimizer = torch.optim.SGD(model.parameters(), lr=lr)

    def predict(self, x):
        return self.model(x.flatten(0, 1)).view(*x.shape[:2], -1)

    def meta_step(self, batch) -> float:
        loss = self.task.loss(self.predict(batch.query_x), batch.query_y)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return loss.item()

    def adapt_and_predict(self, episodes):
        with torch.no_grad():
            return self.predict(episodes.query_x)


class Buggy(Direct):
    def meta_step(self, batch) -> float:
        raise ValueError("a bug in the plugin")  # BUG


class Lazy(Direct):
    def meta_step(self, batch) -> float:  # LAZY
        return 0.0
'''

TESTS = '''
import author_plugin
from author_algorithm import Buggy, Direct, Lazy

from autometa import Backbone, SourceModel, Task
from autometa.testing import check_meta_algorithm, check_plugin

SMALL = {"val_episodes": 4, "test_episodes": 4, "eval_queries": 5}


def test_registration():
    check_plugin(author_plugin, name="author")


def test_task_and_source(autometa_task, autometa_source):
    task = autometa_task("sinusoid", shots=5, **SMALL)
    assert isinstance(task, Task) and task.seed == 0 and task.device.type == "cpu"
    assert task.meta_val().support_x.shape[:2] == (4, 5)
    assert task.identity == {"task": "sinusoid", "params": {"shots": 5, **SMALL}, "seed": 0}
    source = autometa_source(hidden=8)
    assert isinstance(source, SourceModel)
    assert isinstance(source.build(task.spec), Backbone)


def test_host_with_the_plugin(autometa_host, autometa_task):
    host = autometa_host(author=author_plugin)
    assert host.get("algorithm", "direct").load() is Direct
    assert "mlp" in host.names("source")  # the installed plugins too
    check_meta_algorithm(Direct, autometa_task(**SMALL), host.get("source", "mlp").load(),
                         {"hidden": 8})


def test_search(autometa_search, autometa_host):
    board = autometa_search(host=autometa_host(author=author_plugin), algorithms=["direct"],
                            sources=["mlp"])
    assert set(board.frame["algorithm"]) == {"direct"} and len(board.frame) == 2


def test_search_refuses_a_broken_plugin(autometa_search, autometa_host):
    import pytest
    from autometa import PluginError, hookimpl

    class Typo:
        @hookimpl
        def register_task(self, register):
            pass

    with pytest.raises(PluginError, match="plugin 'typo' is broken: invalid hooks"):
        autometa_search(host=autometa_host(typo=Typo()))


def test_bug_in_plugin_code(autometa_task, autometa_source):
    check_meta_algorithm(Buggy, autometa_task(**SMALL), type(autometa_source()))


def test_broken_contract(autometa_task, autometa_source):
    check_meta_algorithm(Lazy, autometa_task(**SMALL), type(autometa_source()))
'''


def line_of(source: str, marker: str) -> int:
    return next(i for i, text in enumerate(source.splitlines(), 1)
                if text.endswith(f"# {marker}"))


def test_the_fixtures_work_and_failures_show_the_plugins_code(
        pytester: pytest.Pytester) -> None:
    pytester.makepyfile(author_plugin=PLUGIN, author_algorithm=ALGORITHM,
                        test_author=TESTS)
    pytester.syspathinsert()
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=5, failed=2)
    out = result.stdout.str()
    algorithm = pytester.path / "author_algorithm.py"
    written = algorithm.read_text()
    # an exception inside plugin code: the plugin's line, none of the kit's frames
    result.stdout.fnmatch_lines([
        '>*raise ValueError("a bug in the plugin")  # BUG',
        "E*ValueError: a bug in the plugin",
        f"{algorithm.name}:{line_of(written, 'BUG')}: ValueError",
    ])
    # a broken contract: the message points at the plugin's method
    result.stdout.fnmatch_lines([
        f"E*AssertionError: Lazy.meta_step (*{algorithm.name}:{line_of(written, 'LAZY')}): "
        "changed no parameter of the model",
    ])
    assert "autometa/testing/" not in out and "check_meta_algorithm(algorithm_cls" not in out


def test_the_fixtures_are_listed_and_cost_no_torch_import() -> None:
    """Loading the plugin (pytest does in every run) imports neither torch nor the checks."""
    code = textwrap.dedent("""
        import sys
        import autometa.testing.pytest_plugin
        from autometa import testing
        assert "torch" not in sys.modules, "torch"
        assert "autometa.testing.checks" not in sys.modules
        testing.check_task  # the checks load on first use
        assert "torch" in sys.modules
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=QUICK_SUBPROCESS)
    assert done.returncode == 0, done.stderr


def test_the_fixtures_are_registered_through_the_entry_point(pytester: pytest.Pytester
                                                             ) -> None:
    result = pytester.runpytest("--fixtures", "-p", "no:cacheprovider")
    for fixture in ("autometa_host", "autometa_task", "autometa_source", "autometa_search"):
        result.stdout.fnmatch_lines([f"{fixture} -- *autometa/testing/pytest_plugin.py:*"])
