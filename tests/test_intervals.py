"""Meta-test intervals: Student's t over episodes, Wilson's over a target's test examples,
checked against scipy's own functions; results stored before bounds existed."""

from __future__ import annotations

import math

import pytest
import torch
from scipy.stats import binomtest
from scipy.stats import t as student

from autometa.intervals import describe, interval_of, student_t, wilson
from autometa.metrics import ACCURACY, EPISODE_ACCURACY, MSE, mean_ci95
from autometa.study.trials import MetaTestScore


def test_wilson_is_scipys_and_never_collapses_to_a_point() -> None:
    """16 right out of 16: a t interval over the 0/1 scores is 1 ± 0, Wilson's is not."""
    ones = [1.0] * 16
    assert student_t(ones).half_width == 0.0  # what a target task reported before
    interval = interval_of(ones, binary=True)
    ci = binomtest(16, 16).proportion_ci(confidence_level=0.95, method="wilson")
    assert interval.method == "wilson" and interval.n == 16 and interval.mean == 1.0
    assert (interval.low, interval.high) == (pytest.approx(ci.low), pytest.approx(ci.high))
    assert interval.low == pytest.approx(0.806, abs=1e-3) and interval.high == 1.0
    # asymmetric: the larger side is the one-number summary
    half = wilson(13, 16)
    assert half.high - half.mean < half.mean - half.low == half.half_width


def test_student_t_is_the_textbook_interval_and_mean_ci95_its_half_width() -> None:
    scores = torch.linspace(0.2, 0.9, 25, dtype=torch.float64) ** 2
    interval = student_t(scores.tolist())
    x = scores.numpy()
    half = student.ppf(0.975, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x))
    assert interval.method == "student-t"
    assert interval.low == pytest.approx(x.mean() - half)
    assert interval.high == pytest.approx(x.mean() + half)
    assert mean_ci95(scores) == (pytest.approx(x.mean()), pytest.approx(half))
    one = student_t([0.5])
    assert one.mean == 0.5 and math.isnan(one.low) and math.isnan(one.half_width)


def test_only_zero_one_scores_of_a_binary_metric_get_wilson() -> None:
    assert ACCURACY.binary and EPISODE_ACCURACY.binary and not MSE.binary
    assert interval_of([0.0, 1.0, 1.0], binary=True).method == "wilson"
    assert interval_of([0.0, 1.0, 1.0], binary=False).method == "student-t"
    assert interval_of([0.2, 1.0, 1.0], binary=True).method == "student-t"  # not outcomes
    # over episodes an accuracy stays Student's t, as the field reports it
    assert MetaTestScore.of([1.0, 0.0, 1.0], "episodes", binary=True).method == "student-t"
    examples = MetaTestScore.of([1.0, 0.0, 1.0], "examples", binary=True)
    assert examples.method == "wilson" and examples.ci95 == examples.mean - examples.low


def test_words_say_which_interval() -> None:
    assert describe("student-t", 600, "episodes") == "95% CI over 600 episodes, Student t"
    assert describe("wilson", 16, "examples") == "95% Wilson interval over 16 test examples"


def test_a_result_stored_before_bounds_gets_them_from_its_scores() -> None:
    """An older study's cached result ({mean, ci95, n, over, scores}) still loads; a
    leaderboard computes its interval again from its scores, or mean ± ci95 without."""
    old = {"mean": 1.0, "ci95": 0.0, "n": 16, "over": "examples", "scores": [1.0] * 16}
    stored = MetaTestScore.from_json(old)
    assert stored.method == "" and math.isnan(stored.low)
    again = stored.with_interval(binary=True)
    assert again.method == "wilson" and again.low == pytest.approx(0.806, abs=1e-3)
    assert again.with_interval(binary=True) is again
    bare = MetaTestScore.from_json({**old, "over": "episodes", "scores": [], "mean": 0.5,
                                    "ci95": 0.1}).with_interval(binary=True)
    assert (bare.method, bare.low, bare.high) == ("student-t", 0.4, 0.6)
    assert MetaTestScore.from_json(again.to_json()) == again
