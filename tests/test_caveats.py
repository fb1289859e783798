"""Warnings about too little data, seen where users see them: a real search through the
CLI (terminal, CSV, Markdown, HTML report), and the rules on their own."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import optuna
import pandas as pd
import pytest
from limits import CLI_SEARCH
from scipy.stats import binomtest

from autometa.caveats import MIN_CLASS_SETS, SMALL_N, few_class_sets, saturated, small_sample
from autometa.metrics import ACCURACY, MSE
from autometa_plugins.glyphs.task import Glyphs
from autometa_plugins.sinusoid.task import Sinusoid


def autometa_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "autometa", *args], cwd=cwd,
                          env={**os.environ, "COLUMNS": "200"}, capture_output=True,
                          text=True, timeout=CLI_SEARCH)


def test_a_target_tasks_test_accuracy_has_a_wilson_interval_and_a_warning(
        tmp_path: Path) -> None:
    """iris with 15 test examples: each listed trial's accuracy gets Wilson's bounds
    (scipy's), the terminal, Markdown and report say which interval it is, and warn that
    it rests on fewer than 30 examples."""
    run = autometa_cli("run", "--task", "iris", "--algorithms", "finetune,protonet",
                       "--sources", "mlp", "--trials", "4", "--meta-steps", "20",
                       "--eval-every", "10", "--seed", "1", "--no-progress",
                       "--task-param", "test_fraction=0.1", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    frame = pd.read_csv(tmp_path / "autometa-reports" / "iris-seed1.csv")
    scored = frame[frame["test_n"] > 0]
    assert len(scored) >= 2 and (scored["test_n"] == 15).all()
    assert (scored["test_ci_method"] == "wilson").all()
    for row in scored.itertuples():
        ci = binomtest(round(row.test_accuracy * 15), 15).proportion_ci(method="wilson")
        assert (row.test_ci_low, row.test_ci_high) == (pytest.approx(ci.low),
                                                       pytest.approx(ci.high))
        assert row.test_ci95 == pytest.approx(max(row.test_accuracy - row.test_ci_low,
                                                  row.test_ci_high - row.test_accuracy))
        assert f"{row.test_accuracy:.4g} [{row.test_ci_low:.3g}, {row.test_ci_high:.3g}]" \
            in run.stdout
    study = optuna.load_study(study_name="iris-seed1", storage=f"sqlite:///{tmp_path}/autometa.db")
    attrs = study.trials[int(scored["trial"].iloc[0])].user_attrs
    assert attrs["test_ci_method"] == "wilson"
    assert attrs["test_ci_low"] == scored["test_ci_low"].iloc[0]
    assert "95% Wilson interval over 15 test examples" in run.stdout
    warning = (f"rest on 15 test examples, fewer than {SMALL_N}: the intervals are wide and "
               "the paired tests can rarely tell trials apart; use more test examples")
    assert warning in " ".join(run.stdout.split())
    assert "saturated" not in run.stdout  # meta-val 1 (its interval: 0.89-1) down to 0.87
    markdown = (tmp_path / "autometa-reports" / "iris-seed1.md").read_text(encoding="utf-8")
    assert "95% Wilson interval over 15 test examples" in markdown
    assert "**Warning:**" in markdown and warning in markdown
    report = autometa_cli("report", "iris-seed1", cwd=tmp_path)
    assert report.returncode == 0, report.stderr
    html = (tmp_path / "autometa-reports" / "iris-seed1.html").read_text(encoding="utf-8")
    assert "mean with its 95% Wilson interval over 15 test examples" in html
    assert "Wilson intervals, clipped to the metric" in html  # the forest plot's caption
    assert "warning: The meta-test intervals and tie groups rest on 15 test examples" in html
    assert "Evaluation protocol: inductive." in html


def test_few_meta_train_classes_and_a_saturated_meta_val_are_warned(tmp_path: Path) -> None:
    """glyphs with 4 meta-train classes for 3-way episodes (4 class sets) and identical
    instances (every trial scores 1 on meta-val): one warning about the classes when the
    search is prepared, and the leaderboard says meta-val is saturated."""
    run = autometa_cli(
        "run", "--task", "glyphs", "--algorithms", "protonet", "--sources", "conv4",
        "--trials", "3", "--meta-steps", "5", "--eval-every", "5", "--seed", "1",
        "--no-progress",
        *(a for p in ("ways=3", "train_classes=4", "val_classes=6", "test_classes=6",
                      "distortion=0", "val_episodes=10", "test_episodes=20", "queries=2",
                      "examples=4") for a in ("--task-param", p)), cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert run.stderr.count("meta-train has 4 classes for 3-way episodes: only 4 distinct "
                            "class set(s) (C(4, 3))") == 1
    assert "Compare against the baselines" in run.stderr
    out = " ".join(run.stdout.split())
    assert "95% CI over 20 episodes, Student t" in out
    assert "rest on 20 meta-test episodes, fewer than 30" in out
    # the 3 searched trials and the 3 baselines on raw inputs, all at 1 on meta-val
    assert ("warning: Meta-val is saturated: the 6 trials scored on meta-test have meta-val "
            "accuracy within 0 of each other") in out
    assert "read the tie groups rather than the ranks" in out
    frame = pd.read_csv(tmp_path / "autometa-reports" / "glyphs-seed1.csv")
    assert (frame["test_ci_method"] == "student-t").all()
    report = autometa_cli("report", "glyphs-seed1", cwd=tmp_path)
    assert report.returncode == 0, report.stderr
    html = (tmp_path / "autometa-reports" / "glyphs-seed1.html").read_text(encoding="utf-8")
    assert "warning: Meta-val is saturated" in html


@pytest.mark.parametrize(("train_classes", "ways", "warned"), [
    (4, 3, True),  # the case: 4 class sets
    (5, 3, True),  # 10 class sets
    (6, 3, False),  # C(6, 3) = 20, and 2 × ways classes
    (9, 5, True),  # 126 class sets but fewer than 2 × ways classes
    (40, 5, False),
])
def test_few_class_sets_threshold(train_classes: int, ways: int, warned: bool) -> None:
    task = Glyphs(ways=ways, shots=1, queries=1, val_episodes=2, test_episodes=2,
                  train_classes=train_classes, val_classes=ways, test_classes=ways,
                  examples=2)
    line = few_class_sets(task)
    assert (line is not None) == warned
    if line:
        assert f"meta-train has {train_classes} classes for {ways}-way" in line
        assert f"below {MIN_CLASS_SETS}" in line
    assert few_class_sets(Sinusoid(val_episodes=2, test_episodes=2)) is None  # no classes


def _frame(val: list[float], test_n: int = 600, half: float = 0.02) -> pd.DataFrame:
    return pd.DataFrame([{"rank": i + 1, "trial": i, "val_accuracy": v, "test_accuracy": v,
                          "test_ci95": half, "test_n": test_n, "test_ci_over": "episodes",
                          "test_ci_method": "student-t"} for i, v in enumerate(val)])


def test_saturation_needs_the_listed_trials_inside_the_best_ones_interval() -> None:
    # 600 test episodes, ± 0.02: sd ≈ 0.25; over 50 meta-val episodes ± 0.071
    assert saturated(_frame([0.95, 0.93, 0.90]), ACCURACY, (50, "episodes")) is not None
    assert saturated(_frame([0.95, 0.93, 0.80]), ACCURACY, (50, "episodes")) is None
    assert saturated(_frame([0.95, 0.93, 0.90]), ACCURACY, (5000, "episodes")) is None
    assert saturated(_frame([0.95]), ACCURACY, (50, "episodes")) is None  # one listed
    # a target dataset: Wilson's interval at the best meta-val accuracy over its examples
    target = _frame([1.0, 0.9375]).assign(test_ci_over="examples", test_ci_method="wilson")
    assert saturated(target, ACCURACY, (16, "examples")) is not None
    regression = _frame([0.3, 0.31]).rename(columns={"val_accuracy": "val_mse",
                                                     "test_accuracy": "test_mse"})
    assert saturated(regression, MSE, (50, "episodes")) is not None
    assert small_sample(_frame([0.9, 0.8], test_n=SMALL_N)) is None
    assert "29 meta-test episodes" in (small_sample(_frame([0.9], test_n=29)) or "")
