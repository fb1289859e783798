"""Declarative hyperparameter spaces.

A plugin declares its hyperparameters as ``{"name": Float(...), ...}``; the engine turns
them into Optuna suggestions under the plugin's own prefix (``maml.inner_lr``), so that
the search space is conditional on the chosen algorithm and source model. A user can
fix a hyperparameter (a scalar), restrict it to choices (a list) or narrow a range
(``{low = .., high = ..}``) from the config; anything else is a :class:`ConfigError`.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from autometa.errors import ConfigError, unknown

if TYPE_CHECKING:
    import optuna


@dataclass(frozen=True)
class Float:
    """A real hyperparameter in ``[low, high]``, sampled on a log scale if ``log``."""

    low: float
    high: float
    log: bool = False


@dataclass(frozen=True)
class Int:
    """An integer hyperparameter in ``[low, high]``."""

    low: int
    high: int
    log: bool = False


@dataclass(frozen=True)
class Categorical:
    """A choice among ``choices`` (bool, int, float or str values)."""

    choices: tuple[Any, ...]


Param = Float | Int | Categorical
SearchSpace = Mapping[str, Param]


def restrict(
    owner: str,
    space: SearchSpace,
    overrides: Mapping[str, Any],
    settable: Collection[str] = (),
) -> dict[str, Any]:
    """Apply user overrides to ``space``; returns ``{name: Param or fixed value}``.

    Args:
        settable: other keyword parameters of the plugin that a user may fix although they
            are not searched (e.g. MAML's ``strategy``); their values pass through as given.

    Raises:
        ConfigError: an unknown hyperparameter, or a value outside its declared type/range.
    """
    out: dict[str, Any] = dict(space)
    for name, value in overrides.items():
        if name in space:
            out[name] = _restrict_one(f"{owner}.{name}", space[name], value)
        elif name in settable:
            out[name] = value
        else:
            raise ConfigError(unknown(f"hyperparameter of {owner}", name, {*space, *settable}))
    return out


def _restrict_one(key: str, param: Param, value: Any) -> Any:
    if isinstance(value, Mapping):
        if isinstance(param, Categorical) or set(value) - {"low", "high"}:
            raise ConfigError(f"{key}: a range needs 'low' and/or 'high' on a numeric parameter")
        low, high = value.get("low", param.low), value.get("high", param.high)
        if not (param.low <= low <= high <= param.high):
            raise ConfigError(
                f"{key}: range [{low}, {high}] is outside the declared [{param.low}, {param.high}]"
            )
        if isinstance(param, Int):
            return Int(int(low), int(high), param.log)
        return Float(float(low), float(high), param.log)
    if isinstance(value, list):
        if not value:
            raise ConfigError(f"{key}: an empty list of choices")
        for v in value:
            check_value(key, param, v)
        return Categorical(tuple(value)) if len(value) > 1 else value[0]
    check_value(key, param, value)
    return value


def check_value(key: str, param: Param, value: Any) -> None:
    if isinstance(param, Categorical):
        if value not in param.choices:
            raise ConfigError(f"{key}: {value!r} is not one of {list(param.choices)}")
        return
    numeric = (int,) if isinstance(param, Int) else (int, float)
    if isinstance(value, bool) or not isinstance(value, numeric):
        expected = "an integer" if isinstance(param, Int) else "a number"
        raise ConfigError(f"{key}: expected {expected}, got {value!r}")
    if not param.low <= value <= param.high:
        raise ConfigError(f"{key}: {value!r} is outside [{param.low}, {param.high}]")


def suggest(trial: optuna.Trial, prefix: str, space: Mapping[str, Any]) -> dict[str, Any]:
    """Sample every entry of a restricted space (fixed values pass through unchanged)."""
    params: dict[str, Any] = {}
    for name, p in space.items():
        key = f"{prefix}.{name}"
        if isinstance(p, Float):
            params[name] = trial.suggest_float(key, p.low, p.high, log=p.log)
        elif isinstance(p, Int):
            params[name] = trial.suggest_int(key, p.low, p.high, log=p.log)
        elif isinstance(p, Categorical):
            params[name] = trial.suggest_categorical(key, list(p.choices))
        else:
            params[name] = p
    return params


def describe(space: SearchSpace) -> str:
    """One line per parameter, for ``autometa plugins --verbose``."""
    parts = []
    for name, p in space.items():
        if isinstance(p, Categorical):
            parts.append(f"{name} in {{{', '.join(map(repr, p.choices))}}}")
        else:
            parts.append(f"{name} in [{p.low}, {p.high}]{' log' if p.log else ''}")
    return "; ".join(parts)
