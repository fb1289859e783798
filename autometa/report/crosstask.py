"""Several studies (one per task): algorithms compared by their average rank across tasks.

Each algorithm is represented in each study by its best-ranked trial (ranked on meta-val).
The algorithms are ranked within each study on that trial's meta-test mean when every
(study, algorithm) pair has one, and otherwise all on their meta-val scores: the ranks
never mix the two. Ranks are 1 = best, in that study's direction; tied scores share the
average of their ranks; the ranks are averaged over the studies.

With at least 3 studies and 2 algorithms present in all of them, a critical-difference
diagram shows which average ranks the Friedman/Nemenyi procedure can tell apart: the
method of Demšar (2006), *Statistical comparisons of classifiers over multiple data
sets*, JMLR 7:1-30, drawn by scikit-posthocs (``posthoc_nemenyi_friedman`` and
``critical_difference_diagram``), with the Friedman test (scipy's
``friedmanchisquare``, from 3 algorithms on) and the critical difference written out.
Few tasks give a wide critical difference: the diagram then mostly says that the data
cannot separate the algorithms.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pandas as pd

from autometa.caveats import finite_number
from autometa.report import plots
from autometa.report.html import Markup, figure, join, note, table, tag

if TYPE_CHECKING:
    from autometa.report.board import Board

#: Significance level of the Nemenyi comparisons in the diagram.
ALPHA = 0.05
#: What a critical-difference diagram needs.
MIN_STUDIES, MIN_ALGORITHMS = 3, 2


@dataclass
class CrossTask:
    """Per-algorithm scores and ranks across studies (algorithms × studies)."""

    scores: pd.DataFrame  # each algorithm's best trial's score per study (NaN: not run)
    basis: str  # "test" or "val": which score every cell is (never a mix)
    missing: list[tuple[str, str]]  # (algorithm, study) whose best trial has no test score
    ranks: pd.DataFrame  # rank within each study, 1 = best; ties share the average rank
    average: pd.Series  # mean rank over the studies an algorithm appears in, best first


def labels(boards: Sequence[Board]) -> list[str]:
    """One distinct label per study: its name, numbered when two share one."""
    out: list[str] = []
    for board in boards:
        label, n = board.study_name, 2
        while label in out:
            label, n = f"{board.study_name} ({n})", n + 1
        out.append(label)
    return out


def cross_task(boards: Sequence[Board]) -> CrossTask:
    """Score and rank each algorithm in each study (see the module docstring)."""
    columns = labels(boards)
    test: dict[str, dict[str, float]] = {}
    val: dict[str, dict[str, float]] = {}
    missing: list[tuple[str, str]] = []
    for label, board in zip(columns, boards, strict=True):
        seen: set[str] = set()
        for d in board.frame.to_dict("records"):  # best first: the first row per algorithm
            name = str(d["algorithm"])
            if name in seen:
                continue
            seen.add(name)
            score = finite_number(d.get(f"test_{board.metric}"))
            if score is None:
                missing.append((name, label))
            else:
                test.setdefault(name, {})[label] = score
            score = finite_number(d.get(f"val_{board.metric}"))
            if score is not None:
                val.setdefault(name, {})[label] = score
    basis = "val" if missing else "test"
    chosen = val if missing else test
    score_frame = pd.DataFrame.from_dict(chosen, orient="index").reindex(columns=columns)
    ranks: dict[str, pd.Series] = {}
    for label, board in zip(columns, boards, strict=True):
        sign = 1.0 if board.direction == "minimize" else -1.0
        ranks[label] = (sign * score_frame[label]).rank(method="average")
    rank_frame = pd.DataFrame(ranks, index=score_frame.index, columns=columns)
    average = rank_frame.mean(axis=1, skipna=True).sort_values(kind="stable")
    return CrossTask(score_frame, basis, missing, rank_frame, average)


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
    from matplotlib.ticker import MaxNLocator

    blocks = common.T.rank(axis=1, method="average")  # studies × algorithms, re-ranked
    sig = sp.posthoc_nemenyi_friedman(blocks.to_numpy())
    sig.index = sig.columns = list(blocks.columns)
    average = blocks.mean(axis=0)
    k = len(average)
    cd = critical_difference(k, studies)
    with plots.drawing(height=max(1.8, 0.28 * k + 1.2)) as (fig, svg):
        ax = fig.add_subplot()
        ax.grid(False)
        sp.critical_difference_diagram(average, sig, ax=ax, alpha=ALPHA)
        # The axis spans every possible rank, 1 to k: left to itself, matplotlib fits it
        # to the drawn lines, and its ticks may stop short of the outer average ranks.
        low = min(1.0, float(average.min()))
        high = max(float(k), float(average.max()))
        pad = 0.03 * (high - low)
        ax.set_xlim(low - pad, high + pad)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(f"average rank over {studies} studies (1 = best); bars join algorithms "
                     f"Nemenyi cannot tell apart (α = {ALPHA}; CD = {cd:.2f})", fontsize=8)
    return svg[0]


def friedman_text(result: CrossTask) -> str:
    """The Friedman test and the critical difference of the algorithms in every study."""
    studies = result.ranks.shape[1]
    common = result.ranks.dropna()
    k = len(common)
    parts: list[str] = []
    if k < 3:
        parts.append(f"The Friedman test needs 3 algorithms present in every study; here {k}.")
    else:
        import warnings

        from scipy.stats import friedmanchisquare

        with warnings.catch_warnings():  # every study tying every algorithm: 0/0
            warnings.simplefilter("ignore", RuntimeWarning)
            stat, p = friedmanchisquare(*common.to_numpy())
        if math.isfinite(stat) and math.isfinite(p):
            parts.append(f"Friedman test ({k} algorithms, {studies} studies): "
                         f"χ² = {stat:.3g}, p = {p:.3g}.")
        else:
            parts.append(f"Friedman test ({k} algorithms, {studies} studies): not defined, "
                         "every study ties them all.")
    if k >= MIN_ALGORITHMS:
        parts.append(f"Critical difference (Nemenyi, α = {ALPHA}): "
                     f"{critical_difference(k, studies):.2f} average ranks.")
    return " ".join(parts)


def critical_difference(k: int, n: int, alpha: float = ALPHA) -> float:
    """Nemenyi's critical difference of average ranks, ``k`` algorithms on ``n`` tasks."""
    from scipy.stats import studentized_range

    q = float(studentized_range.ppf(1 - alpha, k, math.inf)) / math.sqrt(2)
    return q * math.sqrt(k * (k + 1) / (6 * n))


def crosstask_section(boards: Sequence[Board], level: int = 3) -> Markup:
    """The cross-task table (scores, ranks, average rank) and the CD diagram or its note."""
    result = cross_task(boards)
    if result.scores.empty:
        return note("no study has a complete trial: nothing to compare across tasks")
    studies = list(result.scores.columns)
    header: list[object] = ["algorithm", "average rank", "studies"]
    header += [Markup(f"{tag('span', s)}<br>meta-{result.basis} score (rank)")
               for s in studies]
    rows = []
    for key, mean in result.average.items():
        name = str(key)
        cells: list[object] = [name, f"{mean:.2f}",
                               int(result.ranks.loc[name].notna().sum())]
        for s in studies:
            value = finite_number(result.scores.loc[name, s])
            rank = finite_number(result.ranks.loc[name, s])
            cells.append("—" if value is None or rank is None else f"{value:.4g} ({rank:g})")
        rows.append(cells)
    intro: list[object] = []
    if result.missing:
        intro.append(tag("p", _on_val(result.missing)))
    intro.append(tag("p", f"Each algorithm's best trial in each study (ranked on meta-val), "
                          f"scored on meta-{result.basis}, ranked within the study (1 = best, "
                          "ties share the average rank); the average rank is over the "
                          "studies it appears in."))
    diagram = plots.attempt(cd_figure, result)
    shown = note(diagram) if isinstance(diagram, str) else figure(
        diagram.svg, "critical-difference diagram of the algorithms' average ranks across "
                     "studies",
        "Critical-difference diagram (Demšar 2006): Friedman ranks with Nemenyi "
        "post-hoc comparisons.")
    return join([*intro,
                 tag("div", table(header, rows, numeric=list(range(1, len(header)))),
                     class_="scroll"),
                 tag(f"h{level}", "critical-difference diagram"),
                 tag("p", friedman_text(result)), shown])


def _on_val(missing: list[tuple[str, str]]) -> str:
    """The sentence saying why the ranks are on meta-val."""
    pairs = [f"{name} in {study}" for name, study in missing]
    listed = pairs[0] if len(pairs) == 1 else ", ".join(pairs[:-1]) + " and " + pairs[-1]
    if len(pairs) == 1:
        return f"Ranked on meta-val: {listed} has no meta-test score; raise --top-k to score it."
    return (f"Ranked on meta-val: {listed} have no meta-test score; raise --top-k to score "
            "them.")


def _finite(value: object) -> bool:
    return finite_number(value) is not None
