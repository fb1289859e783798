"""autometa: a plugin-based AutoML meta-optimizer for meta-learning in PyTorch.

Importing ``autometa`` is cheap: torch-backed names below are imported on first use, so
``autometa --help``, ``autometa plugins`` and plugin registration never import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from autometa.errors import AutometaError, ConfigError, DataError, PluginError
from autometa.hookspecs import hookimpl, hookspec
from autometa.plugins import PluginHost, PluginInfo, Registration, create_host
from autometa.space import Categorical, Float, Int
from autometa.threads import set_wait_policy
from autometa.version import __version__ as __version__

# Before anything imports torch (the modules above never do): OpenMP reads its wait policy
# once, when torch's libraries load.
set_wait_policy()

#: The public modules: a plugin imports only these, and from each only the names in its
#: ``__all__`` (the stable API, which changes by adding names). Everything else, in these
#: modules (names not in ``__all__``) or in the others (``autometa.engine``,
#: ``autometa.trial``, ...), is internal and may change in any release.
#: tests/test_public_api.py holds the first-party plugins to it.
PUBLIC_MODULES: tuple[str, ...] = (
    "autometa",
    "autometa.task",
    "autometa.source_model",
    "autometa.algorithm",
    "autometa.space",
    "autometa.metrics",
    "autometa.errors",
    "autometa.hookspecs",
    "autometa.events",
    "autometa.testing",
    "autometa.inner_loop",
    "autometa.episodes",
    "autometa.datasets",
    "autometa.weights",
    "autometa.numeric_inputs",
    "autometa.gradient",
    "autometa.adapters",
    "autometa.frozen",
    "autometa.images",
    "autometa.image_store",
    "autometa.augment",
    "autometa.work",
    "autometa.cache",
)

# Public name -> module that defines it, imported lazily (these modules import torch).
_LAZY = {
    "Task": "autometa.task",
    "TaskSpec": "autometa.task",
    "Episodes": "autometa.task",
    "InputBatch": "autometa.task",
    "SourceModel": "autometa.source_model",
    "Backbone": "autometa.source_model",
    "MetaAlgorithm": "autometa.algorithm",
    "GradientMetaLearner": "autometa.gradient",
    "Metric": "autometa.metrics",
    "SearchConfig": "autometa.config",
    "search": "autometa.engine.run",
    "run_search": "autometa.engine.run",
    "join_search": "autometa.engine.run",
    "Leaderboard": "autometa.leaderboard",
    "load_leaderboard": "autometa.leaderboard",
    "load_model": "autometa.predictor",
}

__all__ = [
    "AutometaError",
    "Backbone",
    "Categorical",
    "ConfigError",
    "DataError",
    "Episodes",
    "Float",
    "GradientMetaLearner",
    "InputBatch",
    "Int",
    "Leaderboard",
    "MetaAlgorithm",
    "Metric",
    "PUBLIC_MODULES",
    "PluginError",
    "PluginHost",
    "PluginInfo",
    "Registration",
    "SearchConfig",
    "SourceModel",
    "Task",
    "TaskSpec",
    "create_host",
    "hookimpl",
    "hookspec",
    "join_search",
    "load_leaderboard",
    "load_model",
    "run_search",
    "search",
]

if TYPE_CHECKING:
    from autometa.algorithm import MetaAlgorithm
    from autometa.config import SearchConfig
    from autometa.engine.run import join_search, run_search, search
    from autometa.gradient import GradientMetaLearner
    from autometa.leaderboard import Leaderboard, load_leaderboard
    from autometa.metrics import Metric
    from autometa.predictor import load_model
    from autometa.source_model import Backbone, SourceModel
    from autometa.task import Episodes, InputBatch, Task, TaskSpec


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'autometa' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
