"""Run a search from Python and look at its leaderboard.

    python examples/python_search.py
"""

from __future__ import annotations

import autometa

board = autometa.search(
    "sinusoid",
    algorithms=["maml", "finetune"],
    sources=["mlp"],
    algorithm_params={"maml": {"inner_steps": 1}},  # fix one hyperparameter
    n_trials=8,
    meta_steps=500,
    seed=0,
    study_name="python-example",
    progress=True,
)
print(board.frame[["rank", "algorithm", "val_mse", "test_mse", "test_ci95"]].to_string())
print("best:", board.best["params"])
print("written:", *board.write("autometa-reports"))
