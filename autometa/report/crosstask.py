"""Several studies (one per task): algorithms compared by their average rank across tasks.

Each algorithm is represented in each study by its best-ranked trial (ranked on meta-val),
scored by that trial's meta-test mean, or by its meta-val score when it has no meta-test
score. Algorithms are ranked within each study (1 = best, in that study's direction;
tied scores share the average of their ranks), and the ranks averaged over the studies.

With at least 3 studies and 2 algorithms present in all of them, a critical-difference
diagram shows which average ranks the Friedman/Nemenyi procedure can tell apart: the
method of Demšar (2006), *Statistical comparisons of classifiers over multiple data
sets*, JMLR 7:1-30, drawn by scikit-posthocs (``posthoc_nemenyi_friedman`` and
``critical_difference_diagram``). Few tasks give a wide critical difference: the diagram
then mostly says that the data cannot separate the algorithms.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pandas as pd

from autometa.report import plots
from autometa.report.html import Markup, figure, join, note, table, tag

if TYPE_CHECKING:
    from autometa.leaderboard import Leaderboard

#: Significance level of the Nemenyi comparisons in the diagram.
ALPHA = 0.05
#: What a critical-difference diagram needs.
MIN_STUDIES, MIN_ALGORITHMS = 3, 2


@dataclass
class CrossTask:
    """Per-algorithm scores and ranks across studies (algorithms × studies)."""

    scores: pd.DataFrame  # each algorithm's best trial's score per study (NaN: not run)
    basis: pd.DataFrame  # "test" or "val": which score that is
    ranks: pd.DataFrame  # rank within each study, 1 = best; ties share the average rank
    average: pd.Series  # mean rank over the studies an algorithm appears in, best first


def labels(boards: Sequence[Leaderboard]) -> list[str]:
    """One distinct label per study: its name, numbered when two share one."""
    out: list[str] = []
    for board in boards:
        label, n = board.study_name, 2
        while label in out:
            label, n = f"{board.study_name} ({n})", n + 1
        out.append(label)
    return out


def cross_task(boards: Sequence[Leaderboard]) -> CrossTask:
    """Score and rank each algorithm in each study (see the module docstring)."""
    scores: dict[str, dict[str, float]] = {}
    basis: dict[str, dict[str, str]] = {}
    ranks: dict[str, pd.Series] = {}
    for label, board in zip(labels(boards), boards, strict=True):
        column: dict[str, float] = {}
        for d in board.frame.to_dict("records"):  # best first: the first row per algorithm
            name = str(d["algorithm"])
            if name in column:
                continue
            test, val = _float(d.get(f"test_{board.metric}")), _float(d.get(f"val_{board.metric}"))
            use_test = test is not None
            value = test if test is not None else val
            if value is None:
                continue
            column[name] = value
            basis.setdefault(name, {})[label] = "test" if use_test else "val"
        scores_s = pd.Series(column, dtype=float)
        sign = 1.0 if board.direction == "minimize" else -1.0
        ranks[label] = (sign * scores_s).rank(method="average")
        for name, value in column.items():
            scores.setdefault(name, {})[label] = value
    columns = labels(boards)
    score_frame = pd.DataFrame.from_dict(scores, orient="index").reindex(columns=columns)
    rank_frame = pd.DataFrame(ranks).reindex(index=score_frame.index, columns=columns)
    basis_frame = pd.DataFrame.from_dict(basis, orient="index").reindex(
        index=score_frame.index, columns=columns)
    average = rank_frame.mean(axis=1, skipna=True).sort_values(kind="stable")
    return CrossTask(score_frame, basis_frame, rank_frame, average)


def cd_figure(result: CrossTask) -> bytes:
    """The critical-difference diagram of the algorithms common to every study."""
    studies = result.ranks.shape[1]
    common = result.ranks.dropna()
    if studies < MIN_STUDIES or len(common) < MIN_ALGORITHMS:
        raise plots.Skipped(
            f"critical-difference diagram not drawn: it needs at least {MIN_STUDIES} studies "
            f"and {MIN_ALGORITHMS} algorithms present in all of them; here {studies} "
            f"stud{'y' if studies == 1 else 'ies'} and {len(common)} common algorithm(s)")
    import scikit_posthocs as sp

    blocks = common.T.rank(axis=1, method="average")  # studies × algorithms, re-ranked
    sig = sp.posthoc_nemenyi_friedman(blocks.to_numpy())
    sig.index = sig.columns = list(blocks.columns)
    average = blocks.mean(axis=0)
    cd = critical_difference(len(average), studies)
    with plots.drawing(height=max(1.8, 0.28 * len(average) + 1.2)) as (fig, svg):
        ax = fig.add_subplot()
        ax.grid(False)
        sp.critical_difference_diagram(average, sig, ax=ax, alpha=ALPHA)
        ax.set_title(f"average rank over {studies} studies (1 = best); bars join algorithms "
                     f"Nemenyi cannot tell apart (α = {ALPHA}; CD = {cd:.2f})", fontsize=8)
    return svg[0]


def critical_difference(k: int, n: int, alpha: float = ALPHA) -> float:
    """Nemenyi's critical difference of average ranks, ``k`` algorithms on ``n`` tasks."""
    from scipy.stats import studentized_range

    q = float(studentized_range.ppf(1 - alpha, k, math.inf)) / math.sqrt(2)
    return q * math.sqrt(k * (k + 1) / (6 * n))


def crosstask_section(boards: Sequence[Leaderboard], level: int = 3) -> Markup:
    """The cross-task table (scores, ranks, average rank) and the CD diagram or its note."""
    result = cross_task(boards)
    if result.scores.empty:
        return note("no study has a complete trial: nothing to compare across tasks")
    studies = list(result.scores.columns)
    header: list[object] = ["algorithm", "average rank", "studies"]
    header += [Markup(f"{tag('span', s)}<br>score (rank)") for s in studies]
    rows = []
    for key, mean in result.average.items():
        name = str(key)
        cells: list[object] = [name, f"{mean:.2f}",
                               int(result.ranks.loc[name].notna().sum())]
        for s in studies:
            value, rank = _float(result.scores.loc[name, s]), _float(result.ranks.loc[name, s])
            if value is None or rank is None:
                cells.append("—")
                continue
            val_mark = " val" if result.basis.loc[name, s] == "val" else ""
            cells.append(f"{value:.4g}{val_mark} ({rank:g})")
        rows.append(cells)
    explain = tag("p", "Each algorithm's best trial in each study (ranked on meta-val), scored "
                       "on meta-test (marked “val” where it has no meta-test score), ranked "
                       "within the study (1 = best, ties share the average rank); the "
                       "average rank is over the studies it appears in.")
    diagram = plots.attempt(cd_figure, result)
    shown = note(diagram) if isinstance(diagram, str) else figure(
        diagram, "critical-difference diagram of the algorithms' average ranks across "
                 "studies",
        "Critical-difference diagram (Demšar 2006): Friedman ranks with Nemenyi "
        "post-hoc comparisons.")
    return join([explain,
                 tag("div", table(header, rows, numeric=list(range(1, len(header)))),
                     class_="scroll"),
                 tag(f"h{level}", "critical-difference diagram"), shown])


def _float(value: object) -> float | None:
    """``value`` as a finite float, else None."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _finite(value: object) -> bool:
    return _float(value) is not None
