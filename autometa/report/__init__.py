"""``autometa report``: one self-contained, offline HTML file for one or several studies.

The page is plain HTML with inline CSS and figures embedded as SVG images (data URLs): no
script, no external URL, one file to mail or archive. Modules, one concept each:
:mod:`~autometa.report.board` (what a report reads from a leaderboard: a protocol, so that
the report never imports the leaderboard), :mod:`~autometa.report.html` (escaping, page
assembly), :mod:`~autometa.report.table`
(the leaderboard table), :mod:`~autometa.report.plots` (figures),
:mod:`~autometa.report.provenance` (versions and the reproducing config),
:mod:`~autometa.report.study` (one study's part) and :mod:`~autometa.report.crosstask`
(several studies: average ranks and the critical-difference diagram).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from autometa.errors import ConfigError

if TYPE_CHECKING:
    from autometa.report.board import Board

__all__ = ["check_distinct", "write_report"]


def write_report(boards: Sequence[Board], out: str | Path, *,
                 command: str | None = None) -> Path:
    """Write the HTML report of ``boards`` into the directory ``out`` (created if missing).

    One leaderboard gives ``<out>/<study>.html``; several give ``<out>/report.html``, with a
    cross-task section (each algorithm's average rank across the studies, all on meta-test
    or, when a best trial has no meta-test score, all on meta-val; the Friedman test and
    the critical difference; a critical-difference diagram from 3 studies on) followed by
    one section per study. A study named twice is refused.

    Each study's part holds: a header (task, metric and direction, trials per state); the
    warnings about too little data (:mod:`autometa.caveats`); the leaderboard (meta-val
    score, meta-test mean and 95% interval (n): Student's t over episodes, Wilson's over a
    target's test examples, tie groups, costs and hyperparameters as columns, where the
    leaderboard has them) and the evaluation protocol; for a multi-domain task,
    meta-test per domain (one row per domain, the scored trials as columns,
    :mod:`autometa.report.domains`); figures (meta-val learning
    curves of every trial, optimisation history, hyperparameter importances, a forest plot
    of the best trial per algorithm and per source); trial accounting with each failed
    trial's reason; provenance (autometa and plugin versions, seed, task parameters,
    storage, and the YAML config and command that reproduce the search). A figure without
    enough data is replaced by a one-line note. ``command``, the command line that made
    the report, is shown with the provenance.

    Figures that need the study's trials (learning curves, history, importances, failure
    reasons) are drawn when a leaderboard carries its Optuna study (``board.study``).

    Returns:
        The path of the HTML file.

    Raises:
        ConfigError: ``boards`` is empty, two boards have the same study name, or ``out``
            exists and is not a directory.
    """
    from autometa.report.crosstask import crosstask_section
    from autometa.report.html import join, page, tag
    from autometa.report.study import study_body

    boards = list(boards)
    if not boards:
        raise ConfigError("write_report: no leaderboard given; pass at least one")
    check_distinct(board.study_name for board in boards)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"report folder {str(out)!r} is a file; give a directory")
    out.mkdir(parents=True, exist_ok=True)
    from autometa.version import __version__

    footer = f"made by autometa {__version__}"
    if len(boards) == 1:
        board = boards[0]
        body = join([tag("h1", f"autometa report: {board.study_name}"),
                     study_body(board, command=command, level=2, anchor="study-1")])
        path = out / f"{_file_name(board.study_name)}.html"
        title = f"autometa: {board.study_name}"
    else:
        from autometa.report.crosstask import labels

        names = labels(boards)
        nav = tag("nav", join((tag("a", n, href=f"#study-{i}")
                               for i, n in enumerate(names, start=1)), " "))
        parts = [tag("h1", f"autometa report: {len(boards)} studies"), nav,
                 tag("h2", "across tasks", id="across-tasks"), crosstask_section(boards)]
        for i, (name, board) in enumerate(zip(names, boards, strict=True), start=1):
            parts.append(tag("section", join([
                tag("h2", f"study {name}"),
                study_body(board, command=command if i == 1 else None, level=3,
                           anchor=f"study-{i}")]), id=f"study-{i}"))
        body = join(parts)
        path = out / "report.html"
        title = f"autometa: {', '.join(names)}"
    path.write_text(page(title, body, footer=footer), encoding="utf-8")
    return path


def check_distinct(study_names: Iterable[str]) -> None:
    """Raise :class:`ConfigError` if a study is named twice (it would be counted twice)."""
    seen: set[str] = set()
    for name in study_names:
        if name in seen:
            raise ConfigError(f"study {name!r} is given twice; name each study once")
        seen.add(name)


def _file_name(study_name: str) -> str:
    """The study name as a file name (a valid study name is already one)."""
    return re.sub(r"[^A-Za-z0-9._+=-]", "_", study_name).lstrip(".") or "study"
