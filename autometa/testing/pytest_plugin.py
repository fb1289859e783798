"""pytest fixtures for plugin authors, loaded into every pytest run where autometa is installed.

pytest finds this module through autometa's ``pytest11`` entry point: nothing to configure.
It imports neither torch nor the engine until a fixture is used, so a test suite that does
not use them pays nothing. Each fixture is a factory; every call builds afresh.

``autometa_host(**plugins)``
    A fresh :class:`~autometa.PluginHost` with the installed plugins (entry points) plus
    the in-process ``plugins`` given, ``{name: module_or_object}``; a broken plugin is
    listed, not raised (``host.plugins[name].status``), unless ``AUTOMETA_STRICT_PLUGINS=1``.

``autometa_task(name="sinusoid", *, host=None, **params)``
    The registered task ``name`` built with ``params``, seed 0, on the CPU, as the engine
    builds it (``host``: where to look it up; default the installed plugins).

``autometa_source(name="mlp", *, host=None, **hyperparameters)``
    The registered source model ``name`` built with ``hyperparameters`` (call
    ``.build(task.spec)`` for its network).

``autometa_search(task="sinusoid", *, host=None, **settings)``
    A tiny search run in this process; returns its :class:`~autometa.Leaderboard`.
    ``host``: the plugins to search with, e.g. ``autometa_host(mine=my_plugin)`` to add a
    plugin that is not installed (one that is broken raises its error); default the
    installed plugins. ``settings`` are :class:`~autometa.SearchConfig` fields (``plugins``
    among them: plugins' options) over tiny defaults (:data:`TINY`: 2 trials of 4
    meta-steps, no initial trials, no pruner; :data:`TINY_TASK_PARAMS`: small sinusoid
    splits); the storage and the artifacts go to a fresh folder under ``tmp_path``.

Example, a plugin author's ``tests/test_my_algorithm.py``::

    import my_plugin
    from my_plugin.algorithm import MyAlgorithm
    from autometa.testing import check_meta_algorithm, check_plugin

    def test_the_plugin_registers_lazily():
        check_plugin(my_plugin, name="mine")

    def test_the_algorithm_meets_the_contract(autometa_task, autometa_host):
        task = autometa_task("sinusoid", shots=5, val_episodes=4, test_episodes=4)
        mlp = autometa_host().get("source", "mlp").load()
        check_meta_algorithm(MyAlgorithm, task, mlp, {"hidden": 8})

    def test_a_search_ranks_it(autometa_search, autometa_host):
        board = autometa_search(host=autometa_host(mine=my_plugin), algorithms=["mine"],
                                sources=["mlp"])
        assert set(board.frame["algorithm"]) == {"mine"}
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from autometa.leaderboard import Leaderboard
    from autometa.plugins import PluginHost
    from autometa.source_model import SourceModel
    from autometa.task import Task

#: Search settings of ``autometa_search`` unless a test gives its own.
TINY: dict[str, Any] = {
    "n_trials": 2,
    "meta_steps": 4,
    "eval_every": 2,
    "initial": "none",
    "pruner": "none",
    "seed": 0,
    "top_k": 1,
}
#: Task parameters of ``autometa_search`` per first-party task, under a test's own.
TINY_TASK_PARAMS: dict[str, dict[str, Any]] = {
    "sinusoid": {"val_episodes": 4, "test_episodes": 4, "eval_queries": 5},
}


@pytest.fixture
def autometa_host() -> Callable[..., PluginHost]:
    """``autometa_host(**plugins)``: a fresh host, installed plugins plus ``plugins``."""
    from autometa.plugins import create_host

    def make(**plugins: object) -> PluginHost:
        __tracebackhide__ = True
        # strict=None: AUTOMETA_STRICT_PLUGINS=1 turns a broken plugin into an error here too
        return create_host(entry_points=True, strict=None, plugins=plugins)

    return make


def _default_host(make: Callable[..., PluginHost]) -> Callable[[PluginHost | None], PluginHost]:
    """The host a factory uses when a call names none: built once per test."""
    built: list[PluginHost] = []

    def get(host: PluginHost | None) -> PluginHost:
        __tracebackhide__ = True
        if host is not None:
            return host
        if not built:
            built.append(make())
        return built[0]

    return get


@pytest.fixture
def autometa_task(autometa_host: Callable[..., PluginHost]) -> Callable[..., Task]:
    """``autometa_task(name="sinusoid", *, host=None, **params)``: a registered task, seed
    0, on the CPU."""
    host_of = _default_host(autometa_host)

    def make(name: str = "sinusoid", /, *, host: PluginHost | None = None,
             **params: Any) -> Task:
        __tracebackhide__ = True
        task_cls = host_of(host).get("task", name).load()
        # as autometa.study.build.build_task: the data on the device, the identity set
        task: Task = task_cls(**params, seed=0, device="cpu")
        task.identity = {"task": name, "params": dict(params), "seed": 0}
        return task

    return make


@pytest.fixture
def autometa_source(autometa_host: Callable[..., PluginHost]) -> Callable[..., SourceModel]:
    """``autometa_source(name="mlp", *, host=None, **hyperparameters)``: a registered source
    model."""
    host_of = _default_host(autometa_host)

    def make(name: str = "mlp", /, *, host: PluginHost | None = None,
             **hyperparameters: Any) -> SourceModel:
        __tracebackhide__ = True
        source: SourceModel = host_of(host).get("source", name).load()(**hyperparameters)
        return source

    return make


@pytest.fixture
def autometa_search(tmp_path: Path, autometa_host: Callable[..., PluginHost]
                    ) -> Callable[..., Leaderboard]:
    """``autometa_search(task="sinusoid", *, host=None, **settings)``: a tiny search's
    leaderboard."""
    import autometa
    from autometa.errors import PluginError

    host_of = _default_host(autometa_host)
    runs: list[Path] = []

    def run(task: str = "sinusoid", /, *, host: PluginHost | None = None,
            **settings: Any) -> Leaderboard:
        __tracebackhide__ = True
        root = tmp_path / f"autometa-search-{len(runs)}"  # a new study each call
        root.mkdir()
        runs.append(root)
        host = host_of(host)
        for name, info in host.plugins.items():
            if info.distribution is None and info.status == "broken":  # given in-process
                raise PluginError(f"plugin {name!r} is broken: {info.error}")
        task_params = {**TINY_TASK_PARAMS.get(task, {}), **settings.pop("task_params", {})}
        config = {**TINY, "storage": f"sqlite:///{root / 'autometa.db'}",
                  "artifacts": str(root / "artifacts"), "task_params": task_params, **settings}
        return autometa.search(task, host=host, **config)

    return run
