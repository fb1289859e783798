"""The trials a new study runs before its sampler takes over: a portfolio of every
(algorithm, source) pair at its plugins' defaults, and the best configurations of
earlier studies (warm start). Both run the task's per-trial settings at their defaults
(or the values the search fixes), and float32 where the precision is searched.

Both become Optuna's queued trials (``study.enqueue_trial``), so whichever worker claims
next runs them first, on any machine, and they count against the budget like any other.
They are queued once, when the study is created; a resume never queues them again.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from autometa.errors import ConfigError
from autometa.precision import DEFAULT_PRECISION
from autometa.space import Categorical, Float, Int, check_value
from autometa.study.build import trial_defaults

if TYPE_CHECKING:
    import optuna

    from autometa.engine.prepare import Prepared
    from autometa.plugins import Kind
    from autometa.study.trials import TrialPlan

log = logging.getLogger(__name__)

#: Configurations taken from each earlier study: its best on meta-val that fit the search.
WARM_START_BEST = 3
#: User attribute of a queued trial naming where its configuration came from.
ORIGIN_ATTR = "origin"


@dataclass(frozen=True)
class Queued:
    """A configuration to run first: Optuna parameters and where it came from."""

    params: dict[str, Any]  # {"algorithm": ..., "source": ..., "<plugin>.<hp>": ...}
    origin: str  # "portfolio" or "warm start from <study> trial <n>"


def initial_trials(prepared: Prepared) -> list[Queued]:
    """The configurations a new study queues (warm start first, then the portfolio),
    at most ``n_trials`` of them, without duplicates."""
    config = prepared.config
    queued = warm_start(prepared)
    if config.initial == "portfolio":
        queued += portfolio(prepared)
    seen: set[tuple[tuple[str, Any], ...]] = set()
    unique = []
    for q in queued:
        key = tuple(sorted(q.params.items()))
        if key not in seen:
            seen.add(key)
            unique.append(q)
    if config.n_trials is not None and len(unique) > config.n_trials:
        log.warning("only the first %d of %d initial configurations fit in n_trials=%d",
                    config.n_trials, len(unique), config.n_trials)
        unique = unique[: config.n_trials]
    return unique


def enqueue(study: optuna.Study, queued: list[Queued]) -> None:
    """Queue ``queued`` in ``study`` (Optuna's WAITING trials, taken before new ones)."""
    for q in queued:
        study.enqueue_trial(q.params, user_attrs={ORIGIN_ATTR: q.origin})


def portfolio(prepared: Prepared) -> list[Queued]:
    """Every (algorithm, source) pair of the search once, with each plugin's
    :meth:`~autometa.algorithm.MetaAlgorithm.defaults` (a default outside the search's
    space is left to the sampler).

    Ordered so that the first ``len(algorithms)`` trials try every algorithm and the
    first ``max(len(algorithms), len(sources))`` every source: a budget smaller than the
    number of pairs still covers each algorithm.
    """
    host = prepared.host
    algorithms, sources = list(prepared.algorithms), list(prepared.sources)
    out = []
    for k in range(len(algorithms) * len(sources)):
        a = algorithms[k % len(algorithms)]
        s = sources[(k % len(algorithms) + k // len(algorithms)) % len(sources)]
        params: dict[str, Any] = {"algorithm": a, "source": s}
        kinds: tuple[tuple[Kind, str, Mapping[str, Any]], ...] = (
            ("algorithm", a, prepared.algorithms[a]), ("source", s, prepared.sources[s]))
        for kind, name, space in kinds:
            defaults = host.get(kind, name).load().defaults()
            params |= {f"{name}.{hp}": value for hp, value in defaults.items()
                       if hp in space and _fits(space[hp], value)}
        out.append(Queued(params | _task_defaults(prepared), "portfolio"))
    return out


def warm_start(prepared: Prepared) -> list[Queued]:
    """The best :data:`WARM_START_BEST` configurations of each earlier study (read by
    :func:`~autometa.engine.warm_start.read_warm_start` into ``prepared.warm``) that fit
    this search, as its Optuna parameters. One whose algorithm or source is not in this
    search, or whose value of a hyperparameter searched here is outside this search's
    space, is skipped with a log line and the next best taken; settings fixed here apply
    to all, and the task's per-trial settings are this search's defaults.
    """
    out = []
    for _, plans in prepared.warm:
        taken = 0
        for origin, plan in plans:
            if taken == WARM_START_BEST:
                break
            try:
                params = _matched(prepared, plan)
            except _Mismatch as exc:
                log.warning("%s skipped: %s", origin, exc)
                continue
            out.append(Queued(params, origin))
            taken += 1
    return out


class _Mismatch(Exception):
    """A configuration that does not fit this search (the message says why)."""


def _matched(prepared: Prepared, plan: TrialPlan) -> dict[str, Any]:
    """Optuna parameters of this search for an earlier trial's plan.

    Raises:
        _Mismatch: its algorithm or source is not searched here, or a value of a
            hyperparameter searched here does not fit.
    """
    params: dict[str, Any] = {"algorithm": plan.algorithm, "source": plan.source}
    for kind, name, chosen, values in (
            ("algorithm", plan.algorithm, prepared.algorithms, plan.algorithm_params),
            ("source", plan.source, prepared.sources, plan.source_params)):
        if name not in chosen:
            raise _Mismatch(f"{kind} {name!r} is not in this search")
        for hp, param in chosen[name].items():
            if not isinstance(param, Float | Int | Categorical) or hp not in values:
                continue  # fixed here, or new since: this search's value, or sampled
            if not _fits(param, values[hp]):
                raise _Mismatch(f"{name}.{hp}={values[hp]!r} is outside this search's space")
            params[f"{name}.{hp}"] = values[hp]
    return params | _task_defaults(prepared)


def _task_defaults(prepared: Prepared) -> dict[str, Any]:
    """``{"task.<name>": default}`` of the task's per-trial settings this search samples,
    and ``{"precision": "float32"}`` where it searches the precision, for a queued trial:
    an earlier study's values are not carried over (its task may differ), and a default
    outside this search's space is left to the sampler."""
    defaults = trial_defaults(prepared.task)
    precision = prepared.config.precision
    return {f"task.{name}": defaults[name] for name, param in prepared.task_space.items()
            if _fits(param, defaults[name])} | (
        {"precision": DEFAULT_PRECISION}
        if isinstance(precision, list) and DEFAULT_PRECISION in precision else {})


def _fits(param: Any, value: Any) -> bool:
    if not isinstance(param, Float | Int | Categorical):
        return False  # fixed by the user: not an Optuna parameter
    try:
        check_value("", param, value)
    except ConfigError:
        return False
    return True


def describe(queued: list[Queued]) -> Mapping[str, int]:
    """``{origin kind: count}`` for a log line."""
    counts: dict[str, int] = {}
    for q in queued:
        kind = "portfolio" if q.origin == "portfolio" else "warm start"
        counts[kind] = counts.get(kind, 0) + 1
    return counts
