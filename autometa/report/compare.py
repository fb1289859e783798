"""The per-algorithm and per-source tables (:func:`autometa.comparison.compare`) for
people: the terminal and the Markdown file (:func:`display_rows`, :func:`to_markdown`)
and the HTML report (:func:`comparison_section`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pandas as pd

from autometa.caveats import interval_cell
from autometa.report.html import Markup, join, table, tag

if TYPE_CHECKING:
    from autometa.report.board import Board


def display_columns(key: str) -> list[str]:
    """Column headers of :func:`display_rows` (the metric is named in the title)."""
    return [key, "trial", "rank", "val", "test (95% CI)", "tie", "trials"]


def display_rows(table: pd.DataFrame, key: str, metric: str) -> list[dict[str, str]]:
    """A :func:`compare` table for people (terminal, Markdown and HTML): the trial marked
    ``(completion)`` when it re-ran a pruned configuration, and the trials per state, or
    the note."""
    out = []
    for d in table.to_dict("records"):
        name = d[key] + (" (baseline)" if d["baseline"] else "")
        states = (f"{d['complete']} complete, {d['pruned']} pruned, {d['failed']} failed")
        if pd.isna(d["trial"]):
            values = [name, "", "", "", "", "", d["note"]]
        else:
            test = d[f"test_{metric}"]
            values = [name, str(d["trial"]) + (" (completion)" if d["completion"] else ""),
                      str(d["rank"]), f"{d[f'val_{metric}']:.4g}",
                      "" if _missing(test) else interval_cell(d, test),
                      "" if pd.isna(d["tie_group"]) else str(d["tie_group"]), states]
        out.append(dict(zip(display_columns(key), values, strict=True)))
    return out


def _missing(value: Any) -> bool:
    return value is None or bool(pd.isna(value))


#: What each table's title says, for people.
TITLES = {"algorithm": "Best of each algorithm", "source": "Best of each source model"}
#: The sentence under each table's title.
NOTE = ("Each row: the group's best fully trained (complete, not pruned) trial on meta-val, "
        "its rank in the overall leaderboard, its meta-test score and its tie group against "
        "the overall best; a trial marked (completion) re-ran the best pruned configuration "
        "of an algorithm whose trials were all pruned, with pruning off.")


def comparison_markdown(table: pd.DataFrame, key: str, metric: str) -> list[str]:
    """A Markdown section (lines) of a :func:`compare` table."""
    rows = display_rows(table, key, metric)
    header = display_columns(key)
    lines = ["", f"## {TITLES[key]}", "", NOTE, "",
             "| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(v.replace("|", "\\|") for v in row.values()) + " |"
              for row in rows]
    return lines


def comparison_section(board: Board, key: str, level: int, anchor: str) -> Markup:
    """The HTML table of ``board``'s ``by_<key>`` with its title and what it shows; empty
    Markup when the board has none (a detached leaderboard)."""
    frame = getattr(board, f"by_{key}", None)
    if frame is None or frame.empty:
        return Markup("")
    rows = display_rows(frame, key, board.metric)
    header = display_columns(key)
    return join([tag(f"h{level}", TITLES[key].lower(), id=f"{anchor}-{key}s"), tag("p", NOTE),
                 tag("div", table(header, [list(r.values()) for r in rows],
                                  numeric=[2, 3, 4]), class_="scroll")])
