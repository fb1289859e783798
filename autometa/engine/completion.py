"""Completing each algorithm's best configuration: when a search's budget is spent, every
searched algorithm whose trials were all pruned gets its best pruned configuration run
once more, fully, with pruning off (issue 23: Hyperband pruned every MAML and fine-tuning
trial of the quickstart, so half the comparison was in no table).

What marks such a trial, and what reads it, is :mod:`autometa.study.completion`. The
claim (:func:`autometa.engine.claim.claim`) queues them under the storage's lock once the
budget is claimed and no budgeted trial runs any more (one of those could still complete
an algorithm), so with any number of workers each is queued once; they use no budget and
any worker takes them, as it takes a baseline. A resumed study whose budget is spent
queues the completions it lacks at its first claim. A completion trial that fails is not
queued again (a crashed one is retried, as any trial).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from autometa.study.baselines import is_baseline
from autometa.study.completion import (
    COMPLETES_ATTR,
    COMPLETION_ATTR,
    is_completion,
    plan_field,
    pruned,
)
from autometa.study.trials import ranked

if TYPE_CHECKING:
    import optuna
    from optuna.trial import FrozenTrial

log = logging.getLogger(__name__)


def furthest(trials: list[FrozenTrial], direction: str) -> FrozenTrial:
    """The pruned trial that got furthest: its last reported step largest, then its
    meta-val score there best (ties to the earlier trial)."""
    def key(t: FrozenTrial) -> tuple[int, float, int]:
        step = t.last_step if t.last_step is not None else -1
        value = t.intermediate_values.get(step, t.value) if step >= 0 else t.value
        score = float("nan") if value is None else float(value)
        if score != score:  # never reported a score: last among those at its step
            score = float("inf")
        elif direction == "maximize":
            score = -score
        return (-step, score, t.number)

    return min(trials, key=key)


def to_complete(trials: list[FrozenTrial], algorithms: Sequence[str],
                direction: str) -> list[FrozenTrial]:
    """The pruned trials to re-run in full: for each of ``algorithms`` with no ranked
    (fully trained) searched trial and no completion trial yet (in any state), its
    pruned trial that got furthest (:func:`furthest`); none for an algorithm never
    pruned (never sampled, or only failed)."""
    out = []
    for name in algorithms:
        mine = [t for t in trials if not is_baseline(t) and plan_field(t, "algorithm") == name]
        if any(ranked(t) or is_completion(t) for t in mine):
            continue
        stopped = [t for t in mine if pruned(t) and t.params]
        if stopped:
            out.append(furthest(stopped, direction))
    return out


def queue_completions(study: optuna.Study, trials: list[FrozenTrial],
                      algorithms: Sequence[str]) -> list[int]:
    """Queue a completion trial (Optuna's ``enqueue_trial`` with its parameters) for each
    trial :func:`to_complete` names; returns the numbers of the trials it re-runs. Call
    under the storage lock."""
    from optuna.study import StudyDirection

    direction = "minimize" if study.direction == StudyDirection.MINIMIZE else "maximize"
    picked = to_complete(trials, algorithms, direction)
    for t in picked:
        # Its algorithm named now: a queued trial shows no parameters until it runs, and
        # another worker's claim must see that this algorithm is being completed.
        study.enqueue_trial(dict(t.params), user_attrs={
            COMPLETION_ATTR: True, COMPLETES_ATTR: t.number,
            "algorithm": plan_field(t, "algorithm")}, skip_if_exists=False)
        log.info("every %s trial was pruned: trial %d's configuration runs again in full",
                 plan_field(t, "algorithm"), t.number)
    return [t.number for t in picked]
