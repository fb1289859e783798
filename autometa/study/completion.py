"""Completion trials, and the best trial of each algorithm and each source.

A multi-fidelity pruner judges a trial on its first meta-steps, which is biased against
slow starters (second-order MAML, fine-tuning): in a small search it can stop every trial
of an algorithm, leaving it in no table. So when the budget is spent, the engine re-runs
the best pruned configuration of each searched algorithm that has no fully trained trial
(:mod:`autometa.engine.completion`), once, with pruning off: a *completion* trial, marked
with :data:`COMPLETION_ATTR` (True) and :data:`COMPLETES_ATTR` (the number of the pruned
trial it re-runs). Like a baseline, it uses no budget; unlike one, it holds its Optuna
parameters (it was queued with them), so the sampler learns from it.

:func:`best_per` picks the best ranked trial of each algorithm (or source), the rows of
:attr:`autometa.leaderboard.Leaderboard.by_algorithm`; those trials are always scored on
meta-test and their states are kept (:func:`autometa.study.artifacts.keep_best`).
"""

from __future__ import annotations

from typing import Any

from autometa.study.trials import PRUNED_ATTR

#: Trial user attribute (True) of a completion trial: pruning is off for it.
COMPLETION_ATTR = "completion"
#: Trial user attribute of a completion trial: the number of the pruned trial it re-runs.
COMPLETES_ATTR = "completes"


def is_completion(trial: Any) -> bool:
    """True if an Optuna trial (frozen or running) is a completion trial."""
    return bool(trial.user_attrs.get(COMPLETION_ATTR))


def pruned(trial: Any) -> bool:
    """True if a pruner stopped an Optuna trial (PRUNED, or COMPLETE and marked by the
    Wilcoxon pruner during its final evaluation)."""
    from optuna.trial import TrialState

    return trial.state == TrialState.PRUNED or (
        trial.state == TrialState.COMPLETE and bool(trial.user_attrs.get(PRUNED_ATTR)))


def plan_field(trial: Any, key: str) -> str:
    """A trial's ``algorithm`` or ``source``: its plan (user attributes), else its
    parameter (a queued trial holds only parameters), else ``""``."""
    value = trial.user_attrs.get(key)
    if value is None:
        value = trial.params.get(key, "")
    return str(value)


def best_per(ranked: list[Any], key: str) -> dict[str, Any]:
    """``{algorithm (or source): its best trial}`` from ``ranked`` trials, best first
    (:func:`autometa.study.trials.ranked_trials`); ``key`` is ``"algorithm"`` or
    ``"source"``. Keys in the order of their best trial."""
    out: dict[str, Any] = {}
    for t in ranked:
        out.setdefault(plan_field(t, key), t)
    return out


def group_bests(ranked: list[Any]) -> set[int]:
    """The numbers of the best trial of each algorithm and of each source among
    ``ranked``: listed (scored on meta-test) and kept whatever their rank."""
    return {t.number for key in ("algorithm", "source") for t in best_per(ranked, key).values()}
