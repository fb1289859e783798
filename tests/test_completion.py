"""Every algorithm compared (issue 23): when a pruner stopped every trial of a searched
algorithm, its best pruned configuration runs again in full once the budget is spent (a
completion trial, outside the budget); the leaderboard lists the best fully trained trial
of each algorithm and source with a meta-test score (README: Every algorithm compared)."""

from __future__ import annotations

from pathlib import Path

import optuna
import pandas as pd
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState, create_trial

import autometa
from autometa.comparison import compare
from autometa.engine import claim as claim_module
from autometa.engine.claim import claim, counts
from autometa.engine.completion import furthest, to_complete
from autometa.study.completion import COMPLETES_ATTR, is_completion

#: A search in which Hyperband prunes every fine-tuning trial (seeded, one worker:
#: the same trials every run): fine-tuning's meta-val at the first rung is worse.
PRUNED_SEARCH = {
    "algorithms": ["maml", "reptile", "finetune"], "sources": ["mlp"], "n_trials": 3,
    "meta_steps": 40, "eval_every": 10, "top_k": 1, "seed": 0, "pruner": "hyperband",
    "task_params": {"shots": 5, "val_episodes": 20, "test_episodes": 40},
}


def _distributions() -> dict[str, object]:
    return {"algorithm": CategoricalDistribution(["a", "b"]),
            "a.lr": FloatDistribution(0.0, 1.0)}


def _pruned(algorithm: str, curve: dict[int, float], lr: float = 0.5) -> optuna.trial.FrozenTrial:
    return create_trial(state=TrialState.PRUNED, params={"algorithm": algorithm, "a.lr": lr},
                        distributions=_distributions(), intermediate_values=curve,
                        user_attrs={"algorithm": algorithm})


def test_the_pruned_trial_that_got_furthest_is_completed() -> None:
    early, late_bad, late_good = (_pruned("a", {10: 0.1}), _pruned("a", {10: 0.5, 20: 0.9}),
                                  _pruned("a", {10: 0.5, 20: 0.2}))
    for number, t in enumerate((early, late_bad, late_good)):
        t.number = number
    assert furthest([early, late_bad, late_good], "minimize") is late_good
    assert furthest([early, late_bad, late_good], "maximize") is late_bad
    done = create_trial(state=TrialState.COMPLETE, value=0.3,
                        params={"algorithm": "b", "a.lr": 0.1}, distributions=_distributions(),
                        user_attrs={"algorithm": "b"})
    # "b" has a fully trained trial, "c" no trial at all: neither is completed.
    assert to_complete([early, done], ["a", "b", "c"], "minimize") == [early]
    retried = _pruned("a", {10: 0.1})
    retried.user_attrs["completion"] = True  # a completion trial exists, whatever its state
    assert to_complete([early, retried], ["a"], "minimize") == []


def test_the_claim_queues_completions_and_takes_them_outside_the_budget(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'c.db'}"
    study = optuna.create_study(storage=url, study_name="c")
    study.add_trial(_pruned("a", {10: 0.4, 20: 0.3}, lr=0.25))
    study.add_trial(_pruned("a", {10: 0.2}, lr=0.75))
    # Left queued by a spent budget (an initial configuration beyond n_trials): it must not
    # run ahead of the completion trial.
    study.enqueue_trial({"algorithm": "b", "a.lr": 0.1})

    def take() -> optuna.Trial | None:
        return claim(study, url, 2, None, {}, lambda n: optuna.samplers.RandomSampler(n),
                     complete=["a", "b"])

    trial = take()
    assert trial is not None and is_completion(trial)
    # Another worker's claim while it runs, before its parameters are set: nothing (its
    # algorithm is being completed; the quickstart once completed fine-tuning twice).
    assert take() is None
    assert trial.user_attrs[COMPLETES_ATTR] == 0  # the one that reached step 20
    assert trial.suggest_categorical("algorithm", ["a", "b"]) == "a"  # its configuration
    assert trial.suggest_float("a.lr", 0.0, 1.0) == 0.25
    study.tell(trial, 0.1)
    assert not counts(study.trials[trial.number])  # outside the budget
    assert take() is None  # "a" is complete; "b" has no pruned trial; the budget is spent
    assert [t.state for t in study.trials].count(TrialState.WAITING) == 1


def _no_completions(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(claim_module, "queue_completions", lambda *args: [])


@pytest.mark.parametrize("resume", [False, True])
def test_a_search_ends_with_a_trained_trial_of_every_algorithm(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, resume: bool) -> None:
    settings = {**PRUNED_SEARCH, "storage": f"sqlite:///{tmp_path / 's.db'}",
                "artifacts": str(tmp_path / "art")}
    if resume:  # a study stored before completion trials existed, resumed now
        with monkeypatch.context() as patch:
            _no_completions(patch)
            board = autometa.search("sinusoid", **settings)
        assert "finetune" not in set(board.frame["algorithm"])
        untrained = board.by_algorithm.set_index("algorithm").loc["finetune"]
        assert pd.isna(untrained["trial"])
        assert untrained["note"].startswith("no fully trained trial: pruned 1 time(s)")
    board = autometa.search("sinusoid", **settings)
    trials = board.study.trials
    assert sum(counts(t) for t in trials) == 3  # completions use no budget
    completions = [t for t in trials if is_completion(t)]
    assert [t.params["algorithm"] for t in completions] == ["finetune"]
    assert trials[completions[0].user_attrs[COMPLETES_ATTR]].state == TrialState.PRUNED
    assert set(board.frame["algorithm"]) == set(PRUNED_SEARCH["algorithms"])
    table = board.by_algorithm.set_index("algorithm")
    assert list(table.index) == list(dict.fromkeys(board.frame["algorithm"]))
    assert table["test_mse"].notna().all() and table["tie_group"].notna().all()
    assert table.loc["finetune", "completion"]
    assert int(table.loc["finetune", "trial"]) == completions[0].number
    # Outside top_k = 1, each algorithm's best still has a meta-test score in the ranking.
    assert board.frame["test_mse"].notna().sum() == 3
    markdown = board.to_markdown()
    assert "## Best of each algorithm" in markdown and "(completion)" in markdown
    written = board.write(tmp_path / "out")
    assert tmp_path / "out" / "sinusoid-seed0-algorithms.csv" in written
    assert len(pd.read_csv(tmp_path / "out" / "sinusoid-seed0-algorithms.csv")) == 3


def test_no_completion_without_a_pruner(tmp_path: Path) -> None:
    settings = {**PRUNED_SEARCH, "pruner": "none", "n_trials": 3,
                "storage": f"sqlite:///{tmp_path / 's.db'}", "artifacts": str(tmp_path / "a")}
    board = autometa.search("sinusoid", **settings)
    assert not any(is_completion(t) for t in board.study.trials)


def test_compare_marks_baselines_and_names_an_algorithm_never_trained() -> None:
    frame = pd.DataFrame([
        {"rank": 1, "trial": 4, "algorithm": "nearest-centroid", "source": "raw",
         "baseline": True, "val_acc": 0.9, "test_acc": 0.88, "tie_group": 1},
        {"rank": 2, "trial": 2, "algorithm": "protonet", "source": "conv4",
         "baseline": False, "val_acc": 0.8, "test_acc": 0.79, "tie_group": 2},
    ])
    failed = create_trial(state=TrialState.FAIL, user_attrs={"algorithm": "maml",
                                                            "failure": "diverged"})
    table = compare(frame, [failed], "algorithm", "acc",
                    {"spaces": {"algorithm": {"protonet": {}, "maml": {}, "anil": {}}}})
    rows = table.set_index("algorithm")
    assert list(rows.index) == ["nearest-centroid", "protonet", "maml", "anil"]
    assert rows.loc["nearest-centroid", "baseline"] and not rows.loc["protonet", "baseline"]
    assert rows.loc["maml", "note"] == "no fully trained trial: pruned 0 time(s), failed 1 time(s)"
    assert rows.loc["anil", "note"] == "no trial ran"
    assert int(rows.loc["protonet", "rank"]) == 2


def test_several_workers_end_with_a_trained_trial_of_every_algorithm(tmp_path: Path) -> None:
    # Which trials Hyperband prunes depends on the workers' order: the claim's lock and
    # the "no budgeted trial running" rule must still leave every algorithm trained once.
    settings = {**PRUNED_SEARCH, "workers": 2, "threads": 1,
                "storage": f"sqlite:///{tmp_path / 's.db'}", "artifacts": str(tmp_path / "a")}
    board = autometa.search("sinusoid", **settings)
    trials = board.study.trials
    assert sum(counts(t) for t in trials) == 3
    assert set(board.frame["algorithm"]) == set(PRUNED_SEARCH["algorithms"])
    completed = [t.params["algorithm"] for t in trials if is_completion(t)]
    assert len(completed) == len(set(completed))  # at most one per algorithm


def test_the_trial_count_on_the_terminal_grows_for_trials_beyond_the_budget() -> None:
    """A completion trial ends after the budget's last: the bar shows 3/3, not 3/2."""
    import io

    from rich.console import Console

    from autometa.progress import RichProgress

    progress, shown = RichProgress(), io.StringIO()
    progress.bars.live.console = Console(file=shown, force_terminal=True, width=200)
    with progress:
        progress.search_started(2, 0, None, "mse")
        for number in range(3):
            progress.trial_started(number, "maml on mlp", 10)
            progress.trial_finished(number, "COMPLETE", 0.5 - number / 10, "")
        progress.bars.refresh()
    assert "3/3" in shown.getvalue() and "3/2" not in shown.getvalue()
