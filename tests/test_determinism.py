"""The same search twice, the second beside a CPU-bound process: the same leaderboard;
and what reproduces where: bit-identical with the same threads, within the intervals with
other threads.

``strategy="auto"`` used to time vmap against the loop on the first batch; the machine's
load at that moment decided, the two strategies round differently, and one search gave two
leaderboards. It is now a rule on the model (``autometa.inner_loop.choose_strategy``).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
from limits import BUSY_LOOP_LIFETIME, STOPPED_PROCESS

import autometa
from autometa.leaderboard import COST_COLUMNS
from autometa.metrics import mean_ci95

#: A pure-Python busy loop. The test kills it; should its clean-up never run, it stops by
#: itself once pytest's process is gone or after limits.BUSY_LOOP_LIFETIME.
BUSY_LOOP = ("import os, time\n"
             f"parent, end = os.getppid(), time.monotonic() + {BUSY_LOOP_LIFETIME}\n"
             "while time.monotonic() < end and os.getppid() == parent:\n"
             "    pass\n")


def _search(tmp_path: Path, name: str) -> str:
    board = autometa.search(
        "sinusoid", algorithms=["maml", "finetune"], sources=["mlp"], n_trials=3,
        meta_steps=20, eval_every=10, seed=1, threads=1,
        task_params={"val_episodes": 10, "test_episodes": 10, "eval_queries": 10},
        # Cheap settings: L-BFGS and hundreds of fine-tuning steps would take a minute.
        algorithm_params={"finetune": {"optimizer": "sgd", "finetune_steps": 10},
                          "maml": {"meta_batch_size": 4}},
        source_params={"mlp": {"hidden": 40}},
        storage=f"sqlite:///{tmp_path / name}.db", artifacts=str(tmp_path / name))
    # Seed 1 draws both algorithms (MAML with "auto", first and second order).
    assert set(board.frame["algorithm"]) == {"maml", "finetune"}
    # Everything but the wall-clock costs (fit_time_s, adapt_ms), which a busy machine
    # changes by design.
    assert (board.frame["fit_time_s"] > 0).all()
    return board.frame.drop(columns=list(COST_COLUMNS)).to_csv()


def test_a_busy_machine_does_not_change_the_leaderboard(tmp_path: Path) -> None:
    quiet = _search(tmp_path, "quiet")
    busy = subprocess.Popen([sys.executable, "-c", BUSY_LOOP])
    try:
        loaded = _search(tmp_path, "loaded")
        assert busy.poll() is None  # the busy loop ran during the whole second search
    finally:
        busy.kill()
        busy.wait(STOPPED_PROCESS)
    assert "val_mse" in quiet and "test_mse" in quiet
    assert loaded == quiet


# ----------------------------------------------------------------- what reproduces where
# README, Reproducibility: on one machine with the same threads a search is bit-identical;
# another thread count (or another CPU model: the quickstart's Reptile at its paper's
# settings gave 0.3291 on one CPU, 0.338 on another) changes float rounding, so results
# agree within their reported 95% intervals, not to the bit.


def _quickstart(tmp_path: Path, name: str, threads: int) -> dict[int, dict[str, Any]]:
    """A small quickstart search (its four algorithms, one worker, no pruning, so every
    trial draws the same parameters whatever its neighbours' scores); per trial, what
    it stored."""
    storage = f"sqlite:///{tmp_path / name}.db"
    autometa.search(
        "sinusoid", algorithms=["maml", "metasgd", "reptile", "finetune"], sources=["mlp"],
        n_trials=5, meta_steps=30, eval_every=15, seed=0, threads=threads, pruner="none",
        top_k=5, study_name="quickstart",  # the sampler is seeded by the study's name too
        task_params={"val_episodes": 20, "test_episodes": 40, "eval_queries": 20},
        algorithm_params={"finetune": {"optimizer": "sgd", "finetune_steps": 10}},
        source_params={"mlp": {"hidden": 40}}, storage=storage, artifacts=str(tmp_path / name))
    study = optuna.load_study(study_name="quickstart", storage=storage)
    return {t.number: {"params": t.params, "state": t.state.name, "val": t.value,
                       "curve": t.intermediate_values,
                       "val_scores": t.user_attrs["val_scores"],
                       "test": t.user_attrs["test_mean"], "test_ci95": t.user_attrs["test_ci95"],
                       "test_scores": t.user_attrs["test_scores"]}
            for t in study.trials}


@pytest.mark.slow  # three searches, ~45 s on 2 busy cores
def test_same_machine_and_threads_is_bit_identical_other_threads_within_the_interval(
        tmp_path: Path) -> None:
    """Measured here: with 2 threads, fine-tuning's meta-test MSE moved in its 8th
    significant digit and the other four trials stayed bit-identical (the MLP's vmapped
    matrix products split rows, not sums, over threads)."""
    first = _quickstart(tmp_path, "first", threads=1)
    again = _quickstart(tmp_path, "again", threads=1)
    assert len(first) == 5 and {t["state"] for t in first.values()} == {"COMPLETE"}
    assert {t["params"]["algorithm"] for t in first.values()} == {
        "maml", "metasgd", "reptile", "finetune"}
    for number, trial in first.items():  # ==, not approx: every value to the last bit
        assert again[number] == trial, f"trial {number} differs between two identical runs"
    two = _quickstart(tmp_path, "two-threads", threads=2)
    for number, trial in first.items():
        other = two[number]
        assert other["params"] == trial["params"]
        # Within the 95% interval of each score: meta-val over its episodes, meta-test as
        # the leaderboard reports it.
        _, val_ci95 = mean_ci95(torch.tensor(trial["val_scores"]))
        assert abs(other["val"] - trial["val"]) <= val_ci95
        assert abs(other["test"] - trial["test"]) <= trial["test_ci95"]


@pytest.mark.slow  # two conv4 searches, ~30 s on 2 busy cores
def test_a_conv_search_on_other_threads_agrees_within_the_interval(tmp_path: Path) -> None:
    """On 2 threads a conv4's meta-gradient adds the episodes' gradients in another order
    (autometa.inner_loop's parallel loop: one worker thread per episode group), so the
    trials differ (here: meta-val 0.555 and 0.565, meta-test 0.5625 and 0.5325 of 40
    episodes), within their intervals."""
    glyphs = {"train_classes": 20, "val_classes": 10, "test_classes": 10,
              "val_episodes": 20, "test_episodes": 40, "queries": 2, "examples": 4}
    runs = []
    for threads in (1, 2):
        storage = f"sqlite:///{tmp_path}/t{threads}.db"
        autometa.search("glyphs", n_trials=2, algorithms=["maml"], sources=["conv4"],
                        meta_steps=6, eval_every=3, pruner="none", baselines=False, top_k=2,
                        threads=threads, task_params=glyphs, study_name="g",
                        algorithm_params={"maml": {"meta_batch_size": 4, "inner_steps": 1}},
                        storage=storage, artifacts=str(tmp_path / f"t{threads}"))
        runs.append(optuna.load_study(study_name="g", storage=storage).trials)
    for one, two in zip(*runs, strict=True):
        assert one.params == two.params
        _, val_ci95 = mean_ci95(torch.tensor(one.user_attrs["val_scores"]))
        assert abs(one.value - two.value) <= val_ci95
        assert abs(one.user_attrs["test_mean"] - two.user_attrs["test_mean"]) <= \
            one.user_attrs["test_ci95"]
