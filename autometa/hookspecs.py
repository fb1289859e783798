"""Hook specifications: everything a plugin can implement.

A plugin is a module (or object) with functions decorated by :data:`autometa.hookimpl`
whose names match the specifications below; it implements any subset. The author guide
(``docs/plugins.md``) documents each one with an example; a test fails when a hook here is
missing there.

**Registration hooks** (``register_*``) receive a ``register`` callback and should import
nothing heavy: register a ``"module:attr"`` string that is only imported when a run needs
it, so that ``autometa plugins`` and ``autometa --help`` stay fast.

**Lifecycle hooks** receive ``event``, a frozen dataclass of :mod:`autometa.events`
(``study_name``, the plugin's own ``options``, the report folder ``out``, and the event's
fields). A lifecycle hook that raises is logged and the search goes on
(``AUTOMETA_STRICT_PLUGINS=1``: it is raised). ``search_started``, ``trial_finished`` and
``search_finished`` also keep their original arguments (``study_name``, ``config``,
``trial``, ``leaderboard``) for plugins written before ``event`` existed.

A hook function whose name matches no specification makes its plugin broken, with the
closest specification named (``register_task`` -> ``register_tasks``). Hooks evolve by
adding arguments, never by removing them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

import pluggy

if TYPE_CHECKING:
    from optuna.trial import FrozenTrial

    from autometa.config import SearchConfig
    from autometa.events import (
        LeaderboardLike,
        SearchFailed,
        SearchFinished,
        SearchStarted,
        TrialFailed,
        TrialFinished,
        TrialPruned,
        TrialStarted,
    )

__all__ = ["PROJECT", "Register", "hookimpl", "hookspec"]

PROJECT = "autometa"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


class Register(Protocol):
    """The ``register`` callback passed to the registration hooks."""

    def __call__(self, name: str, factory: Any, *, description: str = "") -> None:
        """Register ``factory`` (a ``"module:attr"`` string, or a class) under ``name``."""


# -- registration: the three kinds of plugins ----------------------------------------------
@hookspec
def register_tasks(register: Register) -> None:
    """Register task definitions: ``register("name", "module:TaskClass")``
    (a subclass of :class:`autometa.Task`)."""


@hookspec
def register_source_models(register: Register) -> None:
    """Register source models: ``register("name", "module:SourceModelClass")``
    (a subclass of :class:`autometa.SourceModel`)."""


@hookspec
def register_meta_algorithms(register: Register) -> None:
    """Register meta-algorithms: ``register("name", "module:MetaAlgorithmClass")``
    (a subclass of :class:`autometa.MetaAlgorithm`)."""


# -- registration: extensions of the engine ------------------------------------------------
@hookspec
def register_pruners(register: Register) -> None:
    """Register Optuna pruners usable as ``pruner = "name"``: the factory is called as
    ``factory(meta_steps=..., eval_every=..., direction=...)`` and returns an
    ``optuna.pruners.BasePruner``; trials report their meta-val score every ``eval_every``
    meta-steps, with the meta-step as the step."""


@hookspec
def register_samplers(register: Register) -> None:
    """Register Optuna samplers usable as ``sampler = "name"``: the factory is called as
    ``factory(seed=...)`` (a 32-bit seed, different for each trial number) and returns an
    ``optuna.samplers.BaseSampler``."""


@hookspec
def register_report_formats(register: Register) -> None:
    """Register formats of ``autometa report --format name``: the factory is called as
    ``factory(leaderboards, out, options=...)`` with a list of
    :class:`autometa.Leaderboard`, the output folder (a ``pathlib.Path``, created) and the
    plugin's options, and returns the path of what it wrote."""


@hookspec
def register_commands(register: Register) -> None:
    """Register ``autometa <name>`` subcommands: the factory is called as
    ``factory(parser)`` with the subcommand's ``argparse.ArgumentParser`` (only when that
    subcommand runs), adds its arguments and returns ``handler(args) -> int`` (the exit
    status). ``description`` is the line ``autometa --help`` shows."""


# -- lifecycle ---------------------------------------------------------------------------------
@hookspec
def search_started(study_name: str, config: SearchConfig, event: SearchStarted) -> None:
    """Called once before the first trial of a search, in the process that runs it."""


@hookspec
def trial_started(event: TrialStarted) -> None:
    """Called when a trial's configuration is sampled, before meta-training, in its worker."""


@hookspec
def trial_pruned(event: TrialPruned) -> None:
    """Called when a pruner stopped a trial (``trial_finished`` follows)."""


@hookspec
def trial_failed(event: TrialFailed) -> None:
    """Called when a trial raised (``trial_finished`` follows)."""


@hookspec
def trial_finished(study_name: str, trial: FrozenTrial, event: TrialFinished) -> None:
    """Called after each trial with its ``optuna.trial.FrozenTrial`` (any final state)."""


@hookspec
def search_finished(study_name: str, leaderboard: LeaderboardLike, event: SearchFinished
                    ) -> None:
    """Called once after a search with its :class:`autometa.Leaderboard`."""


@hookspec
def search_failed(event: SearchFailed) -> None:
    """Called once when a search raised after it started; the error is raised after."""
