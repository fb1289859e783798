"""The HTML leaderboard fits the page (issue 23): a study over every gradient-based
algorithm has dozens of hyperparameters; they wrap in one cell per trial, never past the
right edge. Checked in a real headless Chromium (tests/browser.py) at a laptop's width."""

from __future__ import annotations

from pathlib import Path

from browser import open_page
from conftest import SMALL_SINUSOID

import autometa
from autometa.cli import main

ALGORITHMS = ["maml", "metasgd", "anil", "reptile", "finetune"]


def test_a_leaderboard_with_many_hyperparameters_fits_the_page(tmp_path: Path,
                                                                chromium: str) -> None:
    storage = f"sqlite:///{tmp_path / 'a.db'}"
    board = autometa.search(
        "sinusoid", algorithms=ALGORITHMS, sources=["mlp"], n_trials=len(ALGORITHMS),
        meta_steps=2, eval_every=2, top_k=1, task_params=SMALL_SINUSOID, pruner="none",
        initial="portfolio", source_params={"mlp": {"hidden": 40, "layers": 1}},
        algorithm_params={"finetune": {"finetune_steps": 10}, "reptile": {"eval_steps": 5}},
        study_name="wide", storage=storage, artifacts=str(tmp_path / "art"))
    hyper = [c for c in board.frame.columns if "." in str(c)]
    assert len(hyper) >= 20  # as many columns as the table used to have
    assert main(["report", "wide", "--storage", storage, "--artifacts",
                 str(tmp_path / "art"), "--out", str(tmp_path / "out")]) == 0
    page = tmp_path / "out" / "wide.html"
    check = open_page(page, tmp_path / "shot.png", executable=chromium, width=1024)
    assert check.console_errors == [] and check.page_errors == []
    assert "leaderboard" not in check.too_wide, check.too_wide
    for name in hyper:  # every hyperparameter still shown, as name=value
        assert f"{name}=" in check.text, name
