"""What a report reads from a leaderboard: a protocol, so that the report sits below the
leaderboard (which writes reports through :meth:`autometa.Leaderboard.report`) and never
imports it. :class:`autometa.Leaderboard` has all of it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import optuna
    import pandas as pd


class Board(Protocol):
    """One study's ranked trials, as :class:`autometa.leaderboard.Leaderboard` holds them
    (see its docstring for the columns of ``frame``)."""

    study_name: str
    task: str  # the task plugin's name
    metric: str
    direction: str  # "minimize" or "maximize"
    frame: pd.DataFrame  # one row per ranked trial, best first
    counts: dict[str, int]  # trials per final state
    study: optuna.Study | None  # the study (trials, curves, attributes), None if detached
    stored: dict[str, Any]  # the study's stored settings (autometa.study.settings)
    #: Meta-test per (scored trial, domain) of a multi-domain task; None for a single domain.
    by_domain: pd.DataFrame | None
    #: Sentences on what the scores rest on too little to tell (autometa.caveats).
    caveats: list[str]
    #: The best trial of each algorithm and of each source (autometa.comparison.compare);
    #: None for a detached leaderboard.
    by_algorithm: pd.DataFrame | None
    by_source: pd.DataFrame | None

    @property
    def ci_over(self) -> str:
        """What the test intervals are over: "episodes" or "examples"."""
        ...
