"""Hook specifications: everything a plugin can implement.

A plugin is a module (or object) with functions decorated by :data:`autometa.hookimpl`
whose names match the specifications below. Registration hooks receive a ``register``
callback and should import nothing heavy: register a ``"module:attr"`` string (or a
cheap callable) that is only imported when a run needs it.

A hook function whose name matches no specification makes its plugin broken, with the
closest specification named (``register_task`` -> ``register_tasks``). Hooks evolve by
adding arguments, never by removing them.
"""

from __future__ import annotations

from typing import Any, Protocol

import pluggy

PROJECT = "autometa"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


class Register(Protocol):
    """The ``register`` callback passed to the registration hooks."""

    def __call__(self, name: str, factory: Any, *, description: str = "") -> None:
        """Register ``factory`` (a class or a ``"module:attr"`` string) under ``name``."""


@hookspec
def register_tasks(register: Register) -> None:
    """Register task definitions: ``register("name", "module:TaskClass")``."""


@hookspec
def register_source_models(register: Register) -> None:
    """Register source models: ``register("name", "module:SourceModelClass")``."""


@hookspec
def register_meta_algorithms(register: Register) -> None:
    """Register meta-algorithms: ``register("name", "module:MetaAlgorithmClass")``."""


@hookspec
def search_started(study_name: str, config: Any) -> None:
    """Called once before the first trial of a search (``config`` is a SearchConfig)."""


@hookspec
def trial_finished(study_name: str, trial: Any) -> None:
    """Called after each trial with its ``optuna.trial.FrozenTrial`` (any final state)."""


@hookspec
def search_finished(study_name: str, leaderboard: Any) -> None:
    """Called once after a search with its :class:`autometa.Leaderboard`."""
