"""The baseline trials a new study queues first: the algorithms that never meta-train
(nearest centroid, linear probe, linear SVM) on the ``raw`` inputs and on each searched
source whose features are worth using frozen, at their default settings.

A meta-optimizer earns trust by saying "meta-learning does not pay here" when that is
true; these trials are what it is measured against (README: Baselines). What marks a
baseline trial, and what a ranking says of one, is :mod:`autometa.study.baselines`.

Their plans are fixed, not sampled: each is queued (``study.enqueue_trial``) with no
Optuna parameter and its plan in its user attributes, beside
:data:`~autometa.study.baselines.BASELINE_ATTR`; the worker reads that plan instead of
calling ``suggest``, so the sampler's categorical choices never need to hold the
baseline algorithms. They take no budget (:func:`autometa.engine.claim.counts`), are
queued before every other initial trial, and are queued once, when the study is created.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from autometa.errors import AutometaError
from autometa.params import keyword_defaults
from autometa.precision import DEFAULT_PRECISION
from autometa.space import Categorical, Float, Int, restrict
from autometa.study.baselines import BASELINE_ALGORITHMS, BASELINE_ATTR, RAW_SOURCE
from autometa.study.build import trial_defaults
from autometa.study.inputs import localize
from autometa.study.trials import TrialPlan

if TYPE_CHECKING:
    import optuna

    from autometa.engine.prepare import Prepared
    from autometa.plugins import Kind

log = logging.getLogger(__name__)


def baseline_plans(prepared: Prepared) -> list[TrialPlan]:
    """The plans of the baseline trials of ``prepared``'s search, sources in turn
    (``raw`` first), each with every baseline algorithm that serves the task; none when
    ``baselines`` is off or no baseline algorithm serves the task (a regression task:
    one info line)."""
    if not prepared.config.baselines:
        return []
    task = prepared.task
    algorithms: list[str] = []
    refused: list[str] = []
    for name in BASELINE_ALGORITHMS:
        cls = _load(prepared, "algorithm", name)
        if cls is None:
            continue
        reason = cls.incompatibility(task)
        if reason:
            refused.append(f"{name} {reason}")
        else:
            algorithms.append(name)
    if not algorithms:
        log.info("no baseline trials: %s", "; ".join(refused) or "no baseline algorithm "
                 "is installed")
        return []
    task_params = {**trial_defaults(task),
                   **{k: v for k, v in prepared.task_space.items() if not _searched(v)}}
    precision = prepared.config.precision  # searched: the baselines run the default
    return [TrialPlan(a, s, _settings(prepared, "algorithm", a), params, dict(task_params),
                      precision if isinstance(precision, str) else DEFAULT_PRECISION)
            for s, params in _frozen_sources(prepared) for a in algorithms]


def enqueue_baselines(study: optuna.Study, plans: list[TrialPlan]) -> None:
    """Queue ``plans`` in ``study`` as baseline trials (no Optuna parameter; the plan and
    :data:`~autometa.study.baselines.BASELINE_ATTR` as user attributes)."""
    for plan in plans:
        study.enqueue_trial({}, user_attrs={BASELINE_ATTR: True, **asdict(plan)},
                            skip_if_exists=False)


def _frozen_sources(prepared: Prepared) -> list[tuple[str, dict[str, Any]]]:
    """``(source, settings)`` of ``raw`` (if installed and usable) and of each searched
    source whose instance at these settings has ``pretrained_features``."""
    out: list[tuple[str, dict[str, Any]]] = []
    for name in [RAW_SOURCE, *(s for s in prepared.sources if s != RAW_SOURCE)]:
        cls = _load(prepared, "source", name)
        if cls is None:
            continue
        params = _settings(prepared, "source", name)
        try:
            source = cls(**localize(cls, params, prepared.root))
            reason = source.incompatibility(prepared.task.spec)
        except (AutometaError, TypeError) as exc:
            log.info("no baseline trials on source %r: %s", name, exc)
            continue
        if reason:
            log.info("no baseline trials on source %r: it %s", name, reason)
        elif getattr(source, "pretrained_features", False):
            out.append((name, params))
    return out


def _settings(prepared: Prepared, kind: Kind, name: str) -> dict[str, Any]:
    """A plugin's settings in a baseline trial: its searched hyperparameters at the
    plugin's defaults (a plugin not in the search: those it declares), and the values
    the search fixes."""
    cls = prepared.host.get(kind, name).load()
    chosen = prepared.algorithms if kind == "algorithm" else prepared.sources
    space = chosen.get(name)
    if space is None:  # conditional settings whose condition fails at the defaults: out
        space = restrict(name, prepared.host.get(kind, name).declared(prepared.task), {},
                         defaults=keyword_defaults(cls))
    defaults = cls.defaults()
    return {hp: defaults[hp] if _searched(value) else value for hp, value in space.items()
            if not _searched(value) or hp in defaults}


def _load(prepared: Prepared, kind: Kind, name: str) -> Any:
    """The plugin class registered as ``name``, or None (with an info line) if none is
    installed or it does not load."""
    host = prepared.host
    if not host.registered(kind, name):
        log.info("no baseline trials with %s %r: it is not installed", kind, name)
        return None
    try:
        return host.get(kind, name).load()
    except AutometaError as exc:
        log.info("no baseline trials with %s %r: %s", kind, name, exc)
        return None


def _searched(value: Any) -> bool:
    return isinstance(value, Float | Int | Categorical)
