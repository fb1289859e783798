"""Rank stability: the top 3 of a real small search scored on 600 and on 2,000 meta-test
episodes. README (Results: reports and the model back, "How stable are the ranks?") gives
what this showed and what it means for users."""

from __future__ import annotations

from dataclasses import replace
from itertools import combinations
from pathlib import Path

import pytest
import torch

import autometa
from autometa.metrics import tie_groups
from autometa.study.build import build_task
from autometa.study.stored import open_stored
from autometa.study.trials import ranked_trials
from autometa.trial import restore, score_meta_test


@pytest.mark.slow  # a search of 8 trials, then 3 trials scored twice: about a minute each
@pytest.mark.parametrize(("task_name", "algorithms"), [
    ("sinusoid", ["maml", "finetune", "metasgd", "anil"]),  # regression, MSE
    ("digits", ["protonet", "maml", "finetune"]),  # 5-way 1-shot accuracy
])
def test_top_three_on_600_and_2000_meta_test_episodes(tmp_path: Path, task_name: str,
                                                      algorithms: list[str]) -> None:
    """Ranks that change between 600 and 2,000 episodes were tied at 600: the tie groups,
    not the order of the means, are what a user can rely on."""
    storage, artifacts = f"sqlite:///{tmp_path}/s.db", str(tmp_path / "art")
    autometa.search(task_name, algorithms=algorithms, sources=["mlp"], n_trials=8,
                    meta_steps=60, eval_every=20, seed=5, top_k=3,
                    task_params={"val_episodes": 50, "test_episodes": 600},
                    storage=storage, artifacts=artifacts)
    stored = open_stored(f"{task_name}-seed5", storage, artifacts=artifacts)
    top = ranked_trials(stored.study)[:3]  # the meta-val ranking: the same for both
    results = {}
    for episodes in (600, 2000):
        params = {**stored.config.task_params, "test_episodes": episodes}
        task = build_task(replace(stored.config, task_params=params), stored.host, params,
                          torch.device("cpu"))
        tests = [score_meta_test(restore(stored.study, t, task, stored.host,
                                         artifacts=artifacts), task) for t in top]
        assert all(len(test.scores) == episodes for test in tests)
        groups, pvalues = tie_groups([list(test.scores) for test in tests])
        sign = 1 if task.metric.direction == "minimize" else -1
        order = sorted(range(3), key=lambda i: sign * tests[i].mean)  # best first
        results[episodes] = (tests, groups, order)
        print(f"{task_name}, {episodes} episodes: " + "; ".join(
            f"trial {t.number} {task.metric.name} {x.mean:.4f} ± {x.ci95:.4f} (tie group {g})"
            for t, x, g in zip(top, tests, groups, strict=True))
            + f"; meta-test order {[top[i].number for i in order]}")
    (_, groups600, order600), (_, _, order2000) = results[600], results[2000]
    for a, b in combinations(range(3), 2):
        moved = (order600.index(a) < order600.index(b)) != \
            (order2000.index(a) < order2000.index(b))
        assert not moved or groups600[a] == groups600[b], (
            f"trials {top[a].number} and {top[b].number} swapped between 600 and 2,000 "
            "episodes although the paired test at 600 told them apart")
