"""Meta-test per domain, for a task whose episodes come from several domains (datasets).

The leaderboard keeps one row per (scored trial, domain) (``Leaderboard.by_domain``, the
``<study>-domains.csv`` file): tidy data for pandas. People read it as a matrix instead:
one row per domain, the scored trials as columns in rank order, each cell the trial's mean
± 95% CI over that domain's meta-test episodes. That answers the questions a multi-domain
study raises at a glance (which configuration wins on each domain; does the ranking hold
across domains) without repeating each trial's description on every domain's row; the
domain's number of episodes, the same for every trial, is a column of its own. The
terminal, the Markdown file and the HTML report all show this matrix.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from autometa.report.html import Markup, esc, join, note, tag

if TYPE_CHECKING:
    import pandas as pd

    from autometa.report.board import Board


def domain_matrix(by_domain: pd.DataFrame, metric: str, direction: str
                  ) -> tuple[list[str], list[list[str]], list[int | None]]:
    """The per-domain table as text: its header, its rows (domains in sorted order) and,
    per row, the column index of the best mean (``direction`` "minimize" or "maximize";
    None when no trial has a finite mean; ties to the better-ranked trial).

    Header: ``domain``, ``episodes``, then ``#<rank> trial <n>`` per scored trial in rank
    order; cells ``mean ± half-width`` (the mean alone without an interval).
    """
    trials = by_domain[["rank", "trial"]].drop_duplicates().sort_values("rank")
    columns = [(int(rank), int(trial)) for rank, trial in trials.itertuples(index=False)]
    header = ["domain", "episodes", *(_column(rank, trial) for rank, trial in columns)]
    sign = 1.0 if direction == "minimize" else -1.0
    rows: list[list[str]] = []
    best: list[int | None] = []
    for domain, group in by_domain.groupby("domain", sort=True):
        cells = {int(d["trial"]): d for d in group.to_dict("records")}
        row = [str(domain), str(max(int(d["test_n"]) for d in cells.values()))]
        top: tuple[float, int] | None = None
        for i, (_, trial) in enumerate(columns, start=2):
            d = cells.get(trial, {})
            if _missing(d.get(f"test_{metric}")):
                row.append("")
                continue
            mean, half = float(d[f"test_{metric}"]), d.get("test_ci95")
            row.append(f"{mean:.4g}" if _missing(half) else f"{mean:.4g} ± {half:.2g}")
            if top is None or sign * mean < top[0]:
                top = (sign * mean, i)
        rows.append(row)
        best.append(top[1] if top else None)
    return header, rows, best


def domain_section(board: Board) -> Markup:
    """The HTML per-domain table with a sentence saying what it shows (a note when no trial
    has a meta-test score yet); empty Markup for a single-domain task (no ``by_domain``)."""
    frame = board.by_domain
    if frame is None:
        return Markup("")
    if frame.empty:
        return note("no trial has a meta-test score yet: nothing to show per domain")
    header, rows, best = domain_matrix(frame, board.metric, board.direction)
    body = []
    for row, top in zip(rows, best, strict=True):
        cells = [tag("strong", c) if i == top else c for i, c in enumerate(row)]
        body.append(tag("tr", join((tag("td", c, class_="num" if i else None)
                                    for i, c in enumerate(cells)), "")))
    plugins = {_column(d["rank"], d["trial"]): f"{d['algorithm']} + {d['source']}"
               for d in frame.to_dict("records")}
    head = join((tag("th", Markup(esc(h) + "<br>" + tag("small", plugins[h]))
                     if h in plugins else h) for h in header), "")
    table = tag("table", Markup(tag("thead", tag("tr", head)) + tag("tbody", join(body))),
                class_="domains")
    lead = (f"Meta-test {board.metric} of each scored trial on each domain's episodes: mean ± "
            "95% confidence interval (Student's t) over that domain's episodes; columns in "
            "meta-val rank order, the best mean of each domain in bold. The ranking itself "
            "is on meta-val over every domain.")
    return join([tag("p", lead), tag("div", table, class_="scroll")])


def _column(rank: Any, trial: Any) -> str:
    """A scored trial's column header: ``#<rank> trial <number>``."""
    return f"#{int(rank)} trial {int(trial)}"


def _missing(value: Any) -> bool:
    try:
        return value is None or not math.isfinite(float(value))
    except (TypeError, ValueError):
        return True
