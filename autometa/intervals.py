"""Confidence intervals of a meta-test score, and the words that say which one it is.

Two kinds, as the field reports them:

* **Student's t over episodes** (:func:`student_t`): a few-shot task's meta-test is many
  fixed episodes, each with a score; the mean's interval is symmetric.
* **Wilson's score interval over examples** (:func:`wilson`, Wilson 1927; scipy's
  ``binomtest(...).proportion_ci(method="wilson")``): a target dataset's test split is one
  episode, scored per example, and an accuracy over its ``n`` examples is ``k`` successes
  out of ``n``. A t interval over 0/1 scores collapses to ``1 ± 0`` when every example is
  right; Wilson's does not (16 out of 16: [0.806, 1]), and it stays inside [0, 1]. It is
  asymmetric, so both bounds are kept; its ``half_width`` is the larger side, the
  conservative one-number summary (``test_ci95`` in a leaderboard).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

__all__ = ["Interval", "LEVEL", "Method", "interval_of", "student_t", "wilson"]

#: The confidence level of every interval autometa reports.
LEVEL = 0.95

Method = Literal["student-t", "wilson"]
#: How each method is named in sentences.
METHOD_NAMES: dict[str, str] = {"student-t": "Student t", "wilson": "Wilson"}


@dataclass(frozen=True)
class Interval:
    """A score's mean and its 95% interval ``[low, high]`` over ``n`` scores.

    ``low`` and ``high`` are NaN where no interval exists (fewer than two scores).
    """

    mean: float
    low: float
    high: float
    n: int
    method: Method

    @property
    def half_width(self) -> float:
        """The larger distance from the mean to a bound (the half-width of a symmetric
        interval); NaN without an interval."""
        return max(self.mean - self.low, self.high - self.mean)


def student_t(scores: Sequence[float]) -> Interval:
    """Mean and 95% Student-t interval over ``scores`` (one per episode)."""
    from scipy.stats import t  # scipy comes with scikit-learn

    n = len(scores)
    mean = math.fsum(scores) / n if n else math.nan
    if n < 2:
        return Interval(mean, math.nan, math.nan, n, "student-t")
    sd = math.sqrt(math.fsum((x - mean) ** 2 for x in scores) / (n - 1))
    half = float(t.ppf(0.5 + LEVEL / 2, n - 1)) * sd / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n, "student-t")


def wilson(successes: int, n: int) -> Interval:
    """Proportion ``successes / n`` and its 95% Wilson score interval (scipy)."""
    from scipy.stats import binomtest

    if n < 1:
        return Interval(math.nan, math.nan, math.nan, 0, "wilson")
    ci = binomtest(successes, n).proportion_ci(confidence_level=LEVEL, method="wilson")
    return Interval(successes / n, float(ci.low), float(ci.high), n, "wilson")


def interval_of(scores: Sequence[float], *, binary: bool) -> Interval:
    """The interval ``scores`` get: Wilson's when they are 0/1 outcomes of one split's
    examples (``binary``: a target dataset's test accuracy), else Student's t."""
    if binary:
        successes = sum(1 for x in scores if x == 1.0)
        if successes + sum(1 for x in scores if x == 0.0) == len(scores):
            return wilson(successes, len(scores))
    return student_t(scores)


def describe(method: str, n: int, over: str) -> str:
    """What an interval is, for people: "95% CI over 600 episodes, Student t", "95% Wilson
    interval over 16 test examples"."""
    what = "test examples" if over == "examples" else over or "episodes"
    if method == "wilson":
        return f"95% Wilson interval over {n} {what}"
    return f"95% CI over {n} {what}, {METHOD_NAMES.get(method, 'Student t')}"
