"""What the data cannot carry: sentences saying that an interval, a ranking or a meta-train
split rests on too little, each naming the number and the fix.

* **Few meta-test scores** (:func:`small_sample`): an interval or a tie group over fewer
  than :data:`SMALL_N` episodes or test examples is wide, and the paired tests behind the
  tie groups can rarely tell trials apart.
* **A saturated meta-val** (:func:`saturated`): the trials scored on meta-test all lie
  within the best one's meta-val interval, so meta-val cannot rank them.
* **Trials cut short** (:func:`stopped_at_timeout`): ranked trials whose meta-training
  reached ``trial_timeout`` were scored on fewer meta-steps than their budget.
* **Few meta-train class sets** (:func:`few_class_sets`): a few-shot task whose meta-train
  classes give fewer than :data:`MIN_CLASS_SETS` distinct N-way class sets (or fewer than
  2 × N classes) meta-trains on the same few combinations again and again.

The leaderboard (terminal, Markdown) and the HTML report show the first three
(``Leaderboard.caveats``); the engine logs the third once, when a search is prepared.
How an interval is written for people (:func:`interval_cell`, :func:`interval_text`) lives
here too, as the leaderboard and the report both write it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from autometa.datasets import FewShotTask, InnerTask
from autometa.intervals import describe, wilson
from autometa.study.trials import STOPPED_ATTR
from autometa.trial import scored_per_example

if TYPE_CHECKING:
    import pandas as pd

    from autometa.metrics import Metric
    from autometa.task import Task

__all__ = ["MIN_CLASS_SETS", "SMALL_N", "few_class_sets", "finite_number", "interval_cell",
           "interval_text",
           "leaderboard_caveats", "saturated", "small_sample", "stopped_at_timeout",
           "val_count"]

#: Fewer meta-test episodes or test examples than this: a warning (the usual rule of thumb
#: for a t or normal approximation; Wilson's interval is fine below it, but wide).
SMALL_N = 30
#: Fewer distinct meta-train class sets (C(classes, ways)) than this: a warning.
MIN_CLASS_SETS = 20


def interval_cell(row: Mapping[Any, Any], mean: float) -> str:
    """A leaderboard row's meta-test score for people: ``0.9312 ± 0.021`` (Student t) or
    ``0.9375 [0.717, 0.989]`` (Wilson: asymmetric, its bounds)."""
    low, high = finite_number(row.get("test_ci_low")), finite_number(row.get("test_ci_high"))
    if row.get("test_ci_method") == "wilson" and low is not None and high is not None:
        return f"{mean:.4g} [{low:.3g}, {high:.3g}]"
    half = finite_number(row.get("test_ci95"))
    return f"{mean:.4g}" if half is None else f"{mean:.4g} ± {half:.2g}"


def interval_text(frame: pd.DataFrame) -> str:
    """Which intervals a leaderboard's test column shows: "95% CI over 600 episodes,
    Student t", "95% Wilson interval over 16 test examples" (several, joined by "; ")."""
    seen: dict[str, None] = {}
    for d in _scored(frame):
        method = str(d.get("test_ci_method") or "student-t")
        seen[describe(method, int(d["test_n"]), str(d.get("test_ci_over") or ""))] = None
    return "; ".join(seen) or "95% CI over episodes, Student t"


def val_count(task: Task) -> tuple[int, str]:
    """How many scores a meta-val score averages, and over what: (episodes, "episodes"),
    or (examples, "examples") for a split that is one episode scored per example."""
    episodes = task.meta_val()
    if scored_per_example(episodes, task):
        return int(episodes[0:1].query_y.shape[1]), "examples"
    return len(episodes), "episodes"


def leaderboard_caveats(frame: pd.DataFrame, metric: Metric, val: tuple[int, str],
                        trials: Sequence[Any] = ()) -> list[str]:
    """The warnings a leaderboard shows (:func:`small_sample`, :func:`saturated`, and
    :func:`stopped_at_timeout` of its ranked ``trials``)."""
    return [line for line in (small_sample(frame), saturated(frame, metric, val),
                              stopped_at_timeout(trials)) if line is not None]


def stopped_at_timeout(trials: Sequence[Any]) -> str | None:
    """A sentence naming the ``trials`` (Optuna trials) whose meta-training stopped at
    ``trial_timeout`` (:data:`~autometa.study.trials.STOPPED_ATTR`) and after how many
    meta-steps, else None."""
    cut = [(t.number, t.user_attrs[STOPPED_ATTR]) for t in trials
           if isinstance(t.user_attrs.get(STOPPED_ATTR), dict)]
    if not cut:
        return None
    shown = "; ".join(f"trial {n} after {int(a.get('step', 0)):,} meta-steps in "
                      f"{float(a.get('seconds', math.nan)):.3g} s" for n, a in cut[:10])
    more = f"; and {len(cut) - 10} more" if len(cut) > 10 else ""
    return (f"{len(cut)} ranked trial(s) stopped meta-training at trial_timeout and were "
            f"scored on the model as it was then ({shown}{more}): they trained for fewer "
            f"meta-steps than meta_steps, each for its own number; raise trial_timeout (or "
            f"lower meta_steps) to train every trial in full.")


def small_sample(frame: pd.DataFrame) -> str | None:
    """A sentence if the scored trials' meta-test intervals (and so their tie groups) rest
    on fewer than :data:`SMALL_N` episodes or test examples, else None."""
    scored = _scored(frame)
    if not scored:
        return None
    row = min(scored, key=lambda d: int(d["test_n"]))
    n = int(row["test_n"])
    if n >= SMALL_N:
        return None
    if row.get("test_ci_over") == "examples":
        what, fix = "test examples", "more test examples (a larger test split or more data)"
    else:
        what, fix = "meta-test episodes", "more meta-test episodes (the task's test_episodes)"
    return (f"The meta-test intervals and tie groups rest on {n} {what}, fewer than "
            f"{SMALL_N}: the intervals are wide and the paired tests can rarely tell trials "
            f"apart; use {fix}.")


def saturated(frame: pd.DataFrame, metric: Metric, val: tuple[int, str]) -> str | None:
    """A sentence if meta-val cannot rank the trials scored on meta-test (at least two):
    all of them lie within the 95% interval of the best one's meta-val score, else None.

    The leaderboard's frame holds no per-episode meta-val scores (older trials have none
    at all), so that interval is estimated: Wilson's at the best meta-val accuracy over
    the ``val`` examples of a target dataset, else Student's t over ``val`` episodes with
    the spread of the best scored trial's meta-test scores.
    """
    scored = _scored(frame)
    if len(scored) < 2:
        return None
    name, (n_val, unit) = metric.name, val
    # The best on meta-val, which need not rank first (a baseline it does not beat
    # significantly ranks above it: autometa.study.trials.prefer_baselines).
    top = (max if metric.direction == "maximize" else min)(
        scored, key=lambda d: float(d[f"val_{name}"]))
    best = float(top[f"val_{name}"])
    half = _val_half_width(top, best, metric, n_val, unit)
    if half is None:
        return None
    spread = max(abs(float(d[f"val_{name}"]) - best) for d in scored)
    if spread > half:
        return None
    within = sum(abs(float(v) - best) <= half for v in frame[f"val_{name}"])
    return (f"Meta-val is saturated: the {len(scored)} trials scored on meta-test have "
            f"meta-val {name} within {spread:.3g} of each other, inside the best one's 95% "
            f"interval (± {half:.2g} over {n_val} {unit}; {within} of {len(frame)} ranked "
            f"trials are inside it), so meta-val cannot rank them and their order is chance. "
            f"Make meta-val harder or larger (more or other meta-val classes, a larger "
            f"val_episodes or val split, a harder split), compare against baselines, and "
            f"read the tie groups rather than the ranks.")


def _val_half_width(best: Mapping[Any, Any], value: float, metric: Metric, n_val: int,
                    unit: str) -> float | None:
    """The estimated half-width of the best trial's meta-val interval (see
    :func:`saturated`); None where it cannot be estimated."""
    from scipy.stats import t

    if metric.binary and unit == "examples" and 0 <= value <= 1:
        return wilson(round(value * n_val), n_val).half_width
    half, n_test = finite_number(best.get("test_ci95")), int(best["test_n"])
    if half is None or n_test < 2 or n_val < 2:
        return None
    if best.get("test_ci_method") == "wilson":  # a proportion's spread, not a t interval's
        p = float(best[f"test_{metric.name}"])
        sd = math.sqrt(p * (1 - p))
    else:
        sd = half * math.sqrt(n_test) / float(t.ppf(0.975, n_test - 1))
    return float(t.ppf(0.975, n_val - 1)) * sd / math.sqrt(n_val)


def few_class_sets(task: Task) -> str | None:
    """A sentence if a few-shot task's meta-train classes give fewer than
    :data:`MIN_CLASS_SETS` distinct class sets for its ways, or fewer than 2 × ways
    classes; None otherwise, and for a task that is not a :class:`FewShotTask` (or an
    :class:`InnerTask` built on one)."""
    if not isinstance(task, FewShotTask | InnerTask):
        return None
    shape = task.meta_train_classes()
    if shape is None:
        return None
    classes, ways = shape
    sets = math.comb(classes, ways)
    if sets >= MIN_CLASS_SETS and classes >= 2 * ways:
        return None
    return (f"meta-train has {classes} classes for {ways}-way episodes: only {sets} "
            f"distinct class set(s) (C({classes}, {ways})), and autometa warns below "
            f"{MIN_CLASS_SETS} or under 2 × ways classes; meta-training sees the same few "
            f"combinations again and again and is likely to overfit them. Compare against "
            f"the baselines (nearest-centroid, linear-probe, linear-svm: on by default) and "
            f"fine-tuning, add meta-train classes, or split the "
            f"classes differently.")


def _scored(frame: pd.DataFrame) -> list[dict[Any, Any]]:
    """The rows with a meta-test score and an n, best first."""
    return [d for d in frame.to_dict("records")
            if finite_number(d.get("test_n")) and int(d["test_n"]) > 0
            and not d.get("test_failure")]


def finite_number(value: object) -> float | None:
    """``value`` as a finite float, else None (missing, NaN, infinite, text, a bool): how
    the leaderboard's cells are read (this module, the report's tables)."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None
