"""Baseline trials: what marks one in a stored study, and what a ranking says of it.

A search runs a few baselines besides its searched trials (``baselines = true``, the
default): the algorithms that never meta-train (:data:`BASELINE_ALGORITHMS`) on the
:data:`RAW_SOURCE` and on each searched source whose features are worth using frozen
(:attr:`autometa.source_model.SourceModel.pretrained_features`), at their default
settings. The engine queues them (:mod:`autometa.engine.baselines`); each is an ordinary
Optuna trial whose plan the engine fixed rather than sampled, marked with
:data:`BASELINE_ATTR`. Baselines use no budget (``n_trials`` counts searched trials), are
always scored on meta-test and keep their states, so they are ranked, tied and served
(``autometa predict``) like any trial.
"""

from __future__ import annotations

from typing import Any

#: Trial user attribute (True) of a baseline trial; its plan is in the trial's usual
#: plan attributes (``algorithm``, ``source``, ``algorithm_params``, ...).
BASELINE_ATTR = "baseline"
#: The baseline algorithms, in the order their trials are queued: nearest class mean,
#: per-episode logistic regression, per-episode linear SVM (first-party plugins).
BASELINE_ALGORITHMS = ("nearest-centroid", "linear-probe", "linear-svm")
#: The source whose features are the inputs themselves: baselines always run on it.
RAW_SOURCE = "raw"
#: Plugins a search leaves out when it names no ``algorithms`` (no ``sources``): what
#: they give is the baselines' (a search that names them searches them).
NOT_SEARCHED_BY_DEFAULT = {"algorithm": frozenset({"nearest-centroid", "linear-svm"}),
                           "source": frozenset({RAW_SOURCE})}


def is_baseline(trial: Any) -> bool:
    """True if an Optuna trial (frozen or running) is a baseline trial."""
    return bool(trial.user_attrs.get(BASELINE_ATTR))


def searched(trials: list[Any]) -> list[Any]:
    """``trials`` without the baseline trials, in the same order."""
    return [t for t in trials if not is_baseline(t)]


def baseline_first(algorithm: str, source: str) -> str:
    """The sentence a leaderboard and a report say when a baseline ranks first."""
    on = "raw inputs" if source == RAW_SOURCE else f"the frozen {source} features"
    return (f"A baseline ranks first: meta-learning did not beat {algorithm} on {on} "
            "here.")
