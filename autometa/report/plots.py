"""The report's figures, drawn with matplotlib and rendered to static SVG.

Why matplotlib and SVG: the critical-difference diagram (scikit-posthocs) draws with
matplotlib, so every figure does; a static SVG keeps a report small (plotly would add
3.6 MB of plotly.js to each file), opens offline, and runs no script. Text is drawn as
paths (``svg.fonttype: path``): no user string survives as SVG markup, and the figure
looks the same without the fonts. Figures are :class:`matplotlib.figure.Figure` objects
saved straight to SVG, never made through ``pyplot``: no GUI backend is chosen and no
global figure state is touched (the same as ``matplotlib.use("Agg")``, without changing
the backend of a program that calls us).

Each ``*_figure`` function returns the SVG bytes (or a :class:`Drawn`, when it has notes
to show under the figure), or raises :class:`Skipped` with a one-line reason when there is
too little data to draw it.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import matplotlib
from matplotlib.figure import Figure

from autometa.study.trials import learning_curve, ranked

if TYPE_CHECKING:
    import optuna
    import pandas as pd
    from optuna.trial import FrozenTrial

#: rc settings for every figure: text as paths, no math parsing of user strings (a "$" in
#: a name is text), fixed ids so the same data gives the same bytes.
RC: dict[str, Any] = {
    "svg.fonttype": "path",
    "svg.hashsalt": "autometa",
    "text.parse_math": False,
    "font.size": 9,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
}
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
           "#17becf", "#bcbd22", "#7f7f7f"]
PRUNED = "#c8c8c8"
#: The values a metric can take, by (name, direction): intervals are drawn clipped to it.
RANGES: dict[tuple[str, str], tuple[float, float]] = {
    ("accuracy", "maximize"): (0.0, 1.0),
    ("mse", "minimize"): (0.0, math.inf),
}


class Skipped(Exception):
    """Too little data for a figure; the message is the note shown instead."""


@dataclass(frozen=True)
class Drawn:
    """A figure's SVG and the short notes to show under it."""

    svg: bytes
    notes: tuple[str, ...] = ()


def metric_range(metric: str, direction: str) -> tuple[float, float] | None:
    """The values ``metric`` can take, or None for a metric autometa does not know."""
    return RANGES.get((metric, direction))


@contextmanager
def drawing(width: float = 7.0, height: float = 3.6) -> Iterator[tuple[Figure, list[bytes]]]:
    """A new figure under :data:`RC`; on exit its SVG is appended to the yielded list."""
    out: list[bytes] = []
    with matplotlib.rc_context(cast(Any, RC)):  # typed as literal keys only
        fig = Figure(figsize=(width, height), layout="constrained")
        yield fig, out
        buffer = io.BytesIO()
        fig.savefig(buffer, format="svg", metadata={"Date": None})
    out.append(buffer.getvalue())


def colours(names: Sequence[str]) -> dict[str, str]:
    """One stable colour per name (sorted order, so each study colours alike)."""
    return {n: PALETTE[i % len(PALETTE)] for i, n in enumerate(sorted(set(names)))}


def learning_curves_figure(trials: Sequence[FrozenTrial], best: int | None,
                           metric: str) -> bytes:
    """Meta-val score at each evaluated meta-step, one line per trial.

    Pruned trials are light grey, complete ones coloured by algorithm, trial ``best`` (the
    rank-1 trial) drawn thicker and labelled.
    """
    from optuna.trial import TrialState


    curves = {t.number: learning_curve(t) for t in trials}
    shown = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
             and curves[t.number]]
    if not shown:
        raise Skipped("learning curves: no complete or pruned trial reported a meta-val score")
    algorithms = colours([_algorithm(t) for t in shown])
    with drawing() as (fig, svg):
        ax = fig.add_subplot()
        # Pruned first (underneath), the best last (on top).
        order = sorted(shown, key=lambda t: (ranked(t), t.number == best))
        labelled: set[str] = set()
        for t in order:
            steps = sorted(curves[t.number])
            values = [curves[t.number][s] for s in steps]
            # One evaluation is no line: draw it as a marker.
            single: dict[str, Any] = {"marker": "o", "ms": 4} if len(steps) == 1 else {}
            if not ranked(t):
                label = None if "pruned" in labelled else "pruned"
                ax.plot(steps, values, color=PRUNED, lw=1, label=label, zorder=1, **single)
                labelled.add("pruned")
            elif t.number == best:
                ax.plot(steps, values, color=algorithms[_algorithm(t)], lw=3, marker="o",
                        ms=4, zorder=3, label=f"best: trial {t.number} ({_algorithm(t)})")
            else:
                name = _algorithm(t)
                ax.plot(steps, values, color=algorithms[name], lw=1.3, alpha=0.85, zorder=2,
                        label=None if name in labelled else name, **single)
                labelled.add(name)
        ax.set_xlabel("meta-step")
        ax.set_ylabel(f"meta-val {metric}")
        ax.legend(fontsize=8, loc="best")
    return svg[0]


def history_figure(trials: Sequence[FrozenTrial], direction: str, metric: str) -> bytes:
    """Each complete trial's meta-val score by trial number, and the best so far."""
    from matplotlib.ticker import MaxNLocator


    done = sorted((t for t in trials if ranked(t) and math.isfinite(float(t.value or 0))),
                  key=lambda t: t.number)
    if len(done) < 2:
        raise Skipped(f"optimisation history: {len(done)} complete trial(s); needs 2")
    better = min if direction == "minimize" else max
    numbers = [t.number for t in done]
    values = [float(t.value) for t in done if t.value is not None]
    best_so_far: list[float] = []
    for v in values:
        best_so_far.append(v if not best_so_far else better(best_so_far[-1], v))
    with drawing() as (fig, svg):
        ax = fig.add_subplot()
        ax.scatter(numbers, values, s=18, color=PALETTE[0], label="trial", zorder=2)
        ax.step(numbers, best_so_far, where="post", color=PALETTE[3], lw=1.8,
                label="best so far", zorder=3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("trial number")
        ax.set_ylabel(f"meta-val {metric} ({'lower' if direction == 'minimize' else 'higher'}"
                      " is better)")
        ax.legend(fontsize=8)
    return svg[0]


def importance_figure(study: optuna.Study) -> Drawn:
    """Optuna's hyperparameter importances (its default evaluator), as horizontal bars.

    The evaluator's warnings (e.g. a parameter value tried in fewer than 2 trials) become
    notes under the figure; only an error (too few trials) replaces the figure.
    """
    import warnings

    import optuna

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            importances = optuna.importance.get_param_importances(study)
        except Exception as exc:  # too few trials, a single-valued space, conditional params
            raise Skipped(f"hyperparameter importances: Optuna could not compute them "
                          f"({type(exc).__name__}: {_short(exc)})") from None
    importances = {k: v for k, v in importances.items() if math.isfinite(v)}
    if not importances:
        raise Skipped("hyperparameter importances: no hyperparameter varied across the "
                      "complete trials")
    names = list(importances)[::-1]  # most important on top
    with drawing(height=max(1.6, 0.35 * len(names) + 0.8)) as (fig, svg):
        ax = fig.add_subplot()
        ax.barh(names, [importances[n] for n in names], color=PALETTE[0])
        ax.set_xlabel("importance (share of the meta-val variance explained)")
        ax.grid(axis="y", visible=False)
    return Drawn(svg[0], tuple(f"Optuna warned: {w}" for w in _merged(w.message for w in caught)))


def forest_figure(frame: pd.DataFrame, metric: str, direction: str) -> Drawn:
    """Meta-test mean ± 95% CI of the best-ranked trial of each algorithm and each source.

    Intervals (Student-t, or Wilson's bounds where the frame has them) are drawn clipped
    to the metric's range (:func:`metric_range`), and so is the axis. An algorithm or
    source without a meta-test score is named in a note under the figure.
    """
    tested = frame.loc[frame[f"test_{metric}"].map(_finite).astype(bool)]
    rows: list[tuple[str, float, float, float]] = []  # (label, mean, low, high)
    left_out: list[str] = []
    for by in ("algorithm", "source"):
        for name, group in tested.groupby(by, sort=False):  # frame is best first
            top = group.iloc[0]
            mean = float(top[f"test_{metric}"])
            half = float(top["test_ci95"]) if _finite(top["test_ci95"]) else 0.0
            bounds = (top.get("test_ci_low"), top.get("test_ci_high"))  # Wilson: asymmetric
            lo, hi = map(float, bounds) if all(map(_finite, bounds)) else (mean - half,
                                                                             mean + half)
            rows.append((f"{by} {name} (trial {top['trial']})", mean, lo, hi))
        scored = set(tested[by])
        left_out += [f"{by} {name}: no trial scored on meta-test"
                     for name in dict.fromkeys(frame[by]) if name not in scored]
    if not rows:
        raise Skipped("forest plot: no trial has a meta-test score")
    low, high = metric_range(metric, direction) or (-math.inf, math.inf)
    rows = rows[::-1]  # first listed on top
    below = [mean - max(low, lo) for _, mean, lo, _ in rows]
    above = [min(high, hi) - mean for _, mean, _, hi in rows]
    with drawing(height=max(1.6, 0.32 * len(rows) + 0.9)) as (fig, svg):
        ax = fig.add_subplot()
        ys = list(range(len(rows)))
        ax.errorbar([r[1] for r in rows], ys, xerr=[below, above], fmt="o",
                    color=PALETTE[0], ecolor="#555", capsize=3)
        left, right = ax.get_xlim()
        if max(low, left) < min(high, right):
            ax.set_xlim(max(low, left), min(high, right))
        ax.set_yticks(ys, [r[0] for r in rows])
        ax.set_xlabel(f"meta-test {metric}, mean ± 95% CI "
                      f"({'lower' if direction == 'minimize' else 'higher'} is better)")
        ax.grid(axis="y", visible=False)
    notes = ("left out of the forest plot: " + "; ".join(left_out),) if left_out else ()
    return Drawn(svg[0], notes)


def accounting_figure(counts: Mapping[str, int]) -> bytes:
    """Trials per final state, as horizontal bars."""
    states = ["complete", "pruned", "failed", "interrupted", "running"]
    values = [int(counts.get(s, 0)) for s in states]
    if not sum(values):
        raise Skipped("trial accounting: the study has no trial")
    tint = {"complete": PALETTE[2], "pruned": "#9a9a9a", "failed": PALETTE[3],
            "interrupted": PALETTE[1], "running": PALETTE[0]}
    with drawing(height=1.8) as (fig, svg):
        ax = fig.add_subplot()
        ax.barh(states[::-1], values[::-1], color=[tint[s] for s in states[::-1]])
        for y, v in enumerate(values[::-1]):
            ax.text(v, y, f" {v}", va="center")
        ax.set_xlabel("trials")
        ax.grid(axis="y", visible=False)
    return svg[0]


def _algorithm(trial: FrozenTrial) -> str:
    return str(trial.params.get("algorithm", trial.user_attrs.get("algorithm", "?")))


def _finite(value: Any) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def _short(exc: BaseException | Warning | str, limit: int = 160) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _merged(messages: Iterable[Warning | str]) -> list[str]:
    """Messages without duplicates or backticks; those alike but for one quoted name (one
    per parameter) merged into one that lists the names."""
    names: dict[str, list[str]] = {}  # message with NAME in place of the name: names
    for message in messages:
        text = " ".join(str(message).split())
        quoted = re.findall(r"`([^`]*)`", text)
        key = re.sub(r"`[^`]*`", "\0", text) if len(quoted) == 1 else text.replace("`", "")
        listed = names.setdefault(key, [])
        listed += [q for q in quoted[:1] if len(quoted) == 1 and q not in listed]
    return [_short(key.replace("\0", ", ".join(listed)), 400) for key, listed in names.items()]


def attempt(draw: Callable[..., bytes | Drawn], *args: Any) -> Drawn | str:
    """``draw(*args)`` as a :class:`Drawn`, or the note to show instead when it raises
    :class:`Skipped`."""
    try:
        result = draw(*args)
    except Skipped as exc:
        return str(exc)
    return result if isinstance(result, Drawn) else Drawn(result)
