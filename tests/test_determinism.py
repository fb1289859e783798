"""The same search twice, the second beside a CPU-bound process: the same leaderboard.

``strategy="auto"`` used to time vmap against the loop on the first batch; the machine's
load at that moment decided, the two strategies round differently, and one search gave two
leaderboards. It is now a rule on the model (``autometa.inner_loop.choose_strategy``).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from limits import BUSY_LOOP_LIFETIME, STOPPED_PROCESS

import autometa
from autometa.leaderboard import COST_COLUMNS

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
