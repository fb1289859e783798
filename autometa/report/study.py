"""One study's part of a report: header, leaderboard, figures, trial accounting, provenance."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import pandas as pd

from autometa.report import plots
from autometa.report.compare import comparison_section
from autometa.report.domains import domain_section
from autometa.report.html import Markup, figure, join, note, table, tag
from autometa.report.provenance import provenance_section, stored_settings
from autometa.report.table import leaderboard_table

if TYPE_CHECKING:
    import optuna
    from optuna.trial import FrozenTrial

    from autometa.report.board import Board

STATES = ("complete", "pruned", "failed", "interrupted", "running")

#: The evaluation protocol, stated under every leaderboard.
PROTOCOL = ("Evaluation protocol: inductive. Each meta-val and meta-test episode's model is "
            "adapted on its support set alone and then predicts its queries, which are never "
            "used for adaptation; the model is in eval mode (BatchNorm uses its running "
            "statistics, not the query batch's). Meta-val ranks the trials and drives the "
            "search; meta-test is never seen by the search, and scores only the listed "
            "trials after they are trained.")


def study_of(board: Board) -> optuna.Study | None:
    """The board's Optuna study, when it carries one (a detached leaderboard does not)."""
    return board.study


def header(board: Board) -> Markup:
    """Task, metric and direction, and the trials per state."""
    arrow = "lower is better" if board.direction == "minimize" else "higher is better"
    lead = tag("p", Markup(f"task {tag('strong', board.task)} · metric "
                           f"{tag('strong', board.metric)} ({arrow}) · "
                           f"{sum(board.counts.values())} trials"), class_="lead")
    counts = join((tag("span", f"{board.counts.get(s, 0)} {s}") for s in STATES), "")
    return join([lead, tag("p", counts, class_="counts")])


def study_body(board: Board, *, command: str | None, level: int, anchor: str) -> Markup:
    """Everything about one study below its title; headings start at ``<h{level}>``."""
    study = study_of(board)
    trials = study.get_trials(deepcopy=False) if study is not None else []
    h = f"h{level}"
    parts: list[object] = [header(board)]
    if board.counts.get("running"):
        parts.append(note(f"{board.counts['running']} trial(s) were still running: this is "
                          "a snapshot of the study"))
    parts += [tag(h, "leaderboard", id=f"{anchor}-leaderboard"),
              *(note(f"warning: {c}") for c in board.caveats),
              leaderboard_table(board, study), tag("p", PROTOCOL)]
    for key in ("algorithm", "source"):  # every algorithm and source beside the ranking
        parts.append(comparison_section(board, key, level, anchor))
    if board.by_domain is not None:  # a multi-domain task: meta-test on each domain
        parts += [tag(h, "per domain", id=f"{anchor}-domains"), domain_section(board)]

    parts.append(tag(h, "figures", id=f"{anchor}-figures"))
    best = int(board.frame.iloc[0]["trial"]) if not board.frame.empty else None
    figures: list[Markup] = []
    if study is None:
        parts.append(note("learning curves, history and importances need the study's "
                          "trials, which this leaderboard does not carry"))
    else:
        figures.append(_show(
            plots.attempt(plots.learning_curves_figure, trials, best, board.metric),
            f"meta-val {board.metric} of every trial by meta-step",
            "Learning curves: meta-val score at each evaluation; pruned trials grey, the "
            "rank-1 trial thick."))
        figures.append(_show(
            plots.attempt(plots.history_figure, trials, board.direction, board.metric),
            "optimisation history: meta-val score by trial number, with the best so far",
            "Optimisation history: each complete trial and the best meta-val score so far."))
        figures.append(_show(
            plots.attempt(plots.importance_figure, study),
            "hyperparameter importances",
            "Hyperparameter importances (Optuna's default evaluator, on meta-val scores)."))
    figures.append(_show(
        plots.attempt(plots.forest_figure, board.frame, board.metric, board.direction),
        f"meta-test {board.metric} with 95% confidence intervals of the best trial of each "
        "algorithm and source",
        "Forest plot: the best-ranked trial of each algorithm and of each source model, "
        f"meta-test mean ± 95% CI ({_intervals(board)})."))
    parts.append(tag("div", join(figures), class_="grid"))

    parts.append(tag(h, "trial accounting", id=f"{anchor}-trials"))
    parts.append(_show(plots.attempt(plots.accounting_figure, board.counts),
                       "trials per state: " + ", ".join(f"{board.counts.get(s, 0)} {s}"
                                                        for s in STATES), ""))
    parts.append(_failures(trials, study is not None))

    parts.append(tag(h, "provenance", id=f"{anchor}-provenance"))
    parts.append(provenance_section(board, stored_settings(board, study), command, level + 1))
    return join(parts)


def _show(result: plots.Drawn | str, alt: str, caption: str) -> Markup:
    if isinstance(result, str):
        return note(result)
    return figure(result.svg, alt, caption, result.notes)


def _intervals(board: Board) -> str:
    """How the forest plot's intervals are made and drawn."""
    methods = set(board.frame.get("test_ci_method", pd.Series(dtype=object)).dropna()) - {""}
    kind = " and ".join(("Wilson" if m == "wilson" else "Student-t") for m in sorted(methods)) \
        or "Student-t"
    bounds = plots.metric_range(board.metric, board.direction)
    if bounds is None:
        return f"{kind} intervals"
    low, high = bounds
    shown = f"[{low:g}, ∞)" if math.isinf(high) else f"[{low:g}, {high:g}]"
    return f"{kind} intervals, clipped to the metric's range {shown}"


def _crash(t: FrozenTrial, retries: dict[int, FrozenTrial]) -> str:
    """Why a trial whose process was lost (or that was interrupted) failed, and where its
    copy (Optuna's retry, queued with its parameters) stands."""
    from optuna.trial import TrialState

    crash = t.user_attrs.get("crash")
    if not crash:
        return "no reason recorded"
    retry = retries.get(t.number)
    if retry is None:
        return f"{crash}; not run again (retried too often)"
    if retry.state == TrialState.WAITING:
        return f"{crash}; queued to run again (resume the search)"
    if retry.state == TrialState.RUNNING:
        return f"{crash}; running again as trial {retry.number}"
    return f"{crash}; it ran again as trial {retry.number}"


def _failures(trials: list[FrozenTrial], known: bool) -> Markup:
    from optuna.trial import TrialState

    if not known:
        return note("failure reasons need the study's trials")
    failed = [t for t in trials if t.state == TrialState.FAIL]
    if not failed:
        return tag("p", "No trial failed.")
    # Optuna's retry of a failed trial lists it last in its retry history.
    retries = {r.system_attrs["retry_history"][-1]: r for r in trials
               if r.system_attrs.get("retry_history")}
    rows = [(t.number, t.params.get("algorithm", t.user_attrs.get("algorithm", "")),
             t.params.get("source", t.user_attrs.get("source", "")),
             t.user_attrs.get("failure") or _crash(t, retries)) for t in failed]
    return join([tag("p", f"{len(failed)} failed trial(s) and why:"),
                 tag("div", table(["trial", "algorithm", "source", "reason"], rows,
                                  numeric=[0]), class_="scroll")])
