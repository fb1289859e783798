"""The leaderboard as an HTML table: one row per complete trial, hyperparameters as columns.

Works with the columns every leaderboard has and with those newer ones add when present
(``baseline``, ``tie_group``, ``p_vs_best``, ``fit_time_s``, ``adapt_ms``, ``peak_mem_mb`` and one
``<plugin>.<name>`` column per hyperparameter). For an older leaderboard without the
hyperparameter columns they are read from the study's trials.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from autometa.caveats import finite_number, interval_cell, interval_text
from autometa.report.html import Markup, join, note, tag
from autometa.study.baselines import baseline_first

if TYPE_CHECKING:
    import optuna

    from autometa.report.board import Board


def _fixed(value: float, digits: int = 3) -> str:
    """``value`` to about ``digits`` significant digits, never in scientific notation
    (1080, 10.7, 0.075)."""
    if value == 0:
        return "0"
    decimals = max(0, digits - 1 - math.floor(math.log10(abs(value))))
    text = f"{value:.{decimals}f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


#: Optional columns: (frame column, header, format: a format string or a function).
EXTRA: list[tuple[str, str, str | Callable[[float], str]]] = [
    ("p_vs_best", "p vs #1", "{:.3g}"),
    ("fit_time_s", "fit (s)", _fixed),
    ("adapt_ms", "adapt (ms/episode)", _fixed),
    ("peak_mem_mb", "peak mem (MB)", _fixed),
]


def tie_sentence(over: str) -> str:
    """What the tie marks mean; ``over``: what the paired scores are ("episodes", "examples")."""
    return ("Trials marked “tied with #1” cannot be told apart from the best: a paired "
            f"Wilcoxon test on the same meta-test {over}, Holm-corrected over the listed "
            "trials, finds no difference (the p vs #1 column is its adjusted p-value); a "
            "higher group number is a group of its own, further down.")


def leaderboard_table(board: Board, study: optuna.Study | None) -> Markup:
    """The table, with a sentence above it saying what its marks mean."""
    frame = board.frame
    if frame.empty:
        return note("no complete trial yet: the leaderboard is empty")
    metric = board.metric
    ties = "tie_group" in frame.columns
    extras = [(c, h, f) for c, h, f in EXTRA if c in frame.columns
              and frame[c].map(_finite).any()]
    params, values = _hyperparameters(board, study)
    train = f"train_{metric}" in frame.columns and bool(frame[f"train_{metric}"]
                                                         .map(_finite).any())
    header: list[str] = ["rank"] + (["tie"] if ties else []) + [
        "trial", "algorithm", "source", f"val {metric}"] + ([f"train {metric}"] if train else [])
    header.append(f"test {metric}, 95% interval (n)")
    header += [h for _, h, _ in extras]
    header.append("hyperparameters")
    numeric = {0, header.index("trial"), header.index(f"val {metric}"),
               header.index(f"test {metric}, 95% interval (n)")}
    numeric |= {header.index(f"train {metric}")} if train else set()
    numeric |= {header.index(h) for _, h, _ in extras}
    rows = []
    for d in frame.to_dict("records"):
        cells: list[object] = [d["rank"]]
        css = None
        if ties:
            badge, css = _tie(d.get("tie_group"), int(d["rank"]))
            cells.append(badge)
        algorithm = d["algorithm"] + (" (baseline)" if _baseline(d) else "")
        cells += [d["trial"], algorithm, d["source"], _number(d[f"val_{metric}"], "{:.4g}")]
        cells += [_number(d.get(f"train_{metric}"), "{:.4g}")] if train else []
        cells.append(_test(d, metric))
        cells += [_number(d.get(c), f) for c, _, f in extras]
        if params:  # one cell, its name=value pairs wrapping: the table fits the page
            mine = values.get(int(d["trial"]), {})
            pairs = [f"{p}={_value(mine.get(p))}" for p in params if _value(mine.get(p))]
            cells.append(join((tag("span", pair) for pair in pairs), " "))
        else:
            cells.append(d.get("params", ""))
        last = len(cells) - 1
        rows.append(tag("tr", join((tag("td", c, class_="num" if i in numeric else
                                         "params" if i == last else None)
                                    for i, c in enumerate(cells)), ""), class_=css))
    head = join((tag("th", h) for h in header), "")
    html_table = tag("table", Markup(tag("thead", tag("tr", head)) + tag("tbody", join(rows))),
                     class_="leaderboard")
    over = board.ci_over
    lead = (f"Ranked on meta-val (the search never sees meta-test); trials with equal "
            f"meta-val scores are ordered by trial number (the earlier trial ranks first), "
            f"which decides rank 1 and which trials get meta-test scores. Meta-test is the "
            f"mean with its {interval_text(frame)}, for the best {_tested(board)} trial(s).")
    intro = [tag("p", lead)]
    first = frame.iloc[0].to_dict()
    if _baseline(first):  # the search's verdict, before the table
        intro.append(tag("p", tag("strong", baseline_first(first["algorithm"],
                                                           first["source"]))))
    if ties:
        intro.append(tag("p", tie_sentence(over)))
    return join([*intro, tag("div", html_table, class_="scroll")])


def _baseline(d: dict[Any, Any]) -> bool:
    """True for a baseline trial's row (a leaderboard made before baselines has no
    ``baseline`` column)."""
    value = d.get("baseline")
    return isinstance(value, bool | np.bool_) and bool(value)


def _tested(board: Board) -> int:
    return int(board.frame[f"test_{board.metric}"].map(_finite).sum())


def _tie(group: Any, rank: int) -> tuple[Markup, str | None]:
    if not _finite(group):
        return Markup(""), None
    g = int(group)
    if g == 1:
        text = "best" if rank == 1 else "tied with #1"
        return tag("span", text, class_="badge g1"), ("best" if rank == 1 else "tied")
    return tag("span", f"group {g}", class_="badge"), None


def _test(d: dict[Any, Any], metric: str) -> str:
    """``mean ± half-width (n)``, ``mean [low, high] (n)`` for a Wilson interval, or ""
    without a meta-test score."""
    mean = finite_number(d.get(f"test_{metric}"))
    if mean is None:
        return ""
    n = finite_number(d.get("test_n")) or 0
    return f"{interval_cell(d, mean)} ({n:.0f})"


def _hyperparameters(board: Board, study: optuna.Study | None
                     ) -> tuple[list[str], dict[int, dict[str, Any]]]:
    """Hyperparameter names ``<plugin>.<name>`` and each trial's values: from the study,
    every setting of each trial's plan (fixed ones too, e.g. ``maml.adapter=lora``, a
    source's ``path``); without it, the leaderboard's columns (the searched ones)."""
    frame = board.frame
    if study is None:
        columns = [str(c) for c in frame.columns if "." in str(c)]
        return columns, {int(d["trial"]): {c: d[c] for c in columns}
                         for d in frame.to_dict("records")}
    by_number = {t.number: t for t in study.get_trials(deepcopy=False)}
    values: dict[int, dict[str, Any]] = {}
    for number in frame["trial"]:
        trial = by_number.get(int(number))
        if trial is None:
            continue
        attrs = trial.user_attrs
        mine: dict[str, Any] = {}
        for kind in ("algorithm", "source"):
            plugin = attrs.get(kind, trial.params.get(kind, kind))
            for key, value in (attrs.get(f"{kind}_params") or {}).items():
                mine[f"{plugin}.{key}"] = value
        values[int(number)] = mine
    names = sorted({k for mine in values.values() for k in mine})
    return names, values


def _number(value: Any, fmt: str | Callable[[float], str]) -> str:
    if not _finite(value):
        return ""
    return fmt.format(float(value)) if isinstance(fmt, str) else fmt(float(value))



def _value(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _finite(value: Any) -> bool:
    return finite_number(value) is not None
