"""Declarative hyperparameter spaces.

A plugin declares its hyperparameters as ``{"name": Float(...), ...}``; the engine turns
them into Optuna suggestions under the plugin's own prefix (``maml.inner_lr``), so that
the search space is conditional on the chosen algorithm and source model. A user can
fix a hyperparameter (a scalar), restrict it to choices (a list) or narrow a range
(``{low = .., high = ..}``) from the config; anything else is a :class:`ConfigError`.

A parameter may be **conditional**: ``Int(2, 32, log=True, when=("adapter", "lora"))`` is
searched only when the plugin's hyperparameter ``adapter`` is ``"lora"`` (the user's fixed
value, else the constructor's default). :func:`restrict` drops an inactive one before the
space is stored or sampled, so stored spaces and :func:`suggest` never see a condition; a
user's setting of an inactive one is refused with the fix. The condition's hyperparameter
must be fixed: one that is itself searched is refused (Optuna's define-by-run sampling
would allow it, but stored spaces and the portfolio start assume one flat space).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal

from autometa.errors import ConfigError, unknown
from autometa.params import CliText, parse

if TYPE_CHECKING:
    import optuna

__all__ = ["Categorical", "Float", "Int", "Param", "SearchSpace", "When"]

#: A condition ``(hyperparameter, value)``: the parameter is searched only when that
#: hyperparameter of the same plugin equals that value.
When = tuple[str, Any]


@dataclass(frozen=True)
class Float:
    """A real hyperparameter in ``[low, high]``, sampled on a log scale if ``log``;
    searched only ``when`` its condition holds (module docstring)."""

    low: float
    high: float
    log: bool = False
    when: When | None = None


@dataclass(frozen=True)
class Int:
    """An integer hyperparameter in ``[low, high]``; searched only ``when`` its condition
    holds (module docstring)."""

    low: int
    high: int
    log: bool = False
    when: When | None = None


@dataclass(frozen=True)
class Categorical:
    """A choice among ``choices`` (bool, int, float or str values); searched only ``when``
    its condition holds (module docstring)."""

    choices: tuple[Any, ...]
    when: When | None = None


Param = Float | Int | Categorical
SearchSpace = Mapping[str, Param]


def restrict(
    owner: str,
    space: SearchSpace,
    overrides: Mapping[str, Any],
    settable: Mapping[str, Any] | None = None,
    defaults: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Apply user overrides to ``space``; returns ``{name: Param or fixed value}``.

    Every value is parsed as its declared type first (see :mod:`autometa.params`):
    command-line text becomes a bool, number or choice; anything else must already be one.
    Conditional parameters whose condition does not hold are left out (module docstring).

    Args:
        settable: ``{parameter: declared type}`` of the plugin's other keyword parameters,
            which a user may fix although they are not searched (e.g. MAML's ``strategy``).
        defaults: ``{parameter: default}`` of the plugin's constructor: the value a
            condition is checked against where the user fixed none.

    Raises:
        ConfigError: an unknown hyperparameter, a value outside its declared type/range, a
            setting of a parameter whose condition does not hold, or a condition on a
            searched (not fixed) hyperparameter.
    """
    settable = settable or {}
    out: dict[str, Any] = dict(space)
    for name, value in overrides.items():
        key = f"{owner}.{name}"
        if name in space:
            out[name] = _restrict_one(key, space[name], value)
        elif name in settable:
            out[name] = parse(key, settable[name], value)
        else:
            raise ConfigError(unknown(f"hyperparameter of {owner}", name, {*space, *settable}))
    return _active(owner, space, out, overrides, defaults or {})


def _active(owner: str, space: SearchSpace, out: dict[str, Any], overrides: Mapping[str, Any],
            defaults: Mapping[str, Any]) -> dict[str, Any]:
    """``out`` without the conditional parameters whose condition does not hold."""
    kept: dict[str, Any] = {}
    for name, value in out.items():
        when = getattr(space.get(name), "when", None)
        if when is None:
            kept[name] = value
            continue
        on, wanted = when
        if on in out:
            current = out[on]
            if isinstance(current, Float | Int | Categorical):
                raise ConfigError(
                    f"{owner}.{name} is searched only when {owner}.{on} is {wanted!r}, and "
                    f"{owner}.{on} is itself searched; fix it, e.g. {owner}.{on}={wanted}")
        elif on in defaults:
            current = defaults[on]
        else:
            raise ConfigError(f"{owner}.{name} is searched when {owner}.{on} is {wanted!r}, but "
                              f"{owner} has no setting {on!r} with a default: fix its "
                              "search_space()")
        if current == wanted:  # active: its condition is spent
            kept[name] = (replace(value, when=None)
                          if isinstance(value, Float | Int | Categorical) else value)
        elif name in overrides:
            raise ConfigError(f"{owner}.{name} applies only when {owner}.{on} is {wanted!r} "
                              f"(it is {current!r}); set {owner}.{on}={wanted}, or drop "
                              f"{owner}.{name}")
    return kept


def _restrict_one(key: str, param: Param, value: Any) -> Any:
    if isinstance(value, Mapping):
        if isinstance(param, Categorical) or not value or set(value) - {"low", "high"}:
            raise ConfigError(f"{key}: a range is a table with 'low' and/or 'high' on a numeric "
                              f"parameter, e.g. {{low = 0.01, high = 0.1}}; got {dict(value)!r}")
        low = _bound(f"{key}.low", param, value.get("low", param.low))
        high = _bound(f"{key}.high", param, value.get("high", param.high))
        if low > high:
            raise ConfigError(f"{key}: range low {low} is above high {high}; swap them")
        if not (param.low <= low and high <= param.high):
            raise ConfigError(
                f"{key}: range [{low}, {high}] is not inside the declared "
                f"[{param.low}, {param.high}]"
            )
        if isinstance(param, Int):
            return Int(int(low), int(high), param.log)
        return Float(float(low), float(high), param.log)
    if isinstance(value, list | tuple):
        if not value:
            raise ConfigError(f"{key}: an empty list of choices; give at least one value")
        parsed = list(dict.fromkeys(parse_value(key, param, v) for v in value))
        return Categorical(tuple(parsed)) if len(parsed) > 1 else parsed[0]
    return parse_value(key, param, value)


def _bound(key: str, param: Param, value: Any) -> int | float:
    if isinstance(param, Int):
        return parse(key, int, value)
    return parse(key, float, value)


def parse_value(key: str, param: Param, value: Any) -> Any:
    """``value`` parsed for ``param`` (command-line text included) and checked against it.

    Raises:
        ConfigError: not of the parameter's type, not one of its choices, or out of range.
    """
    if isinstance(param, Categorical):
        choices = tuple(param.choices)
        try:
            return parse(key, Literal[choices], value)
        except ConfigError:
            words = (" (on the command line: true/false, 1/0 or yes/no)"
                     if any(type(c) is bool for c in choices) else "")
            raise ConfigError(f"{key}: {_given(value)} is not one of "
                              f"{list(param.choices)}{words}") from None
    value = parse(key, int if isinstance(param, Int) else float, value)
    check_value(key, param, value)
    return value


def _given(value: Any) -> str:
    return repr(str(value)) if isinstance(value, CliText) else repr(value)


def check_value(key: str, param: Param, value: Any) -> None:
    """Raise :class:`ConfigError` unless ``value`` (already typed) fits ``param``."""
    if isinstance(param, Categorical):
        if value not in param.choices:
            raise ConfigError(f"{key}: {value!r} is not one of {list(param.choices)}")
        return
    numeric = (int,) if isinstance(param, Int) else (int, float)
    if isinstance(value, bool) or not isinstance(value, numeric) or not math.isfinite(value):
        expected = "an integer" if isinstance(param, Int) else "a finite number"
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
            part = f"{name} in {{{', '.join(map(repr, p.choices))}}}"
        else:
            part = f"{name} in [{p.low}, {p.high}]{' log' if p.log else ''}"
        parts.append(part + condition(p))
    return "; ".join(parts)


def condition(param: Any) -> str:
    """`` when adapter='lora'`` for a conditional parameter, else ``""``."""
    when = getattr(param, "when", None)
    return "" if when is None else f" when {when[0]}={when[1]!r}"


def to_json(space: Mapping[str, Any]) -> dict[str, Any]:
    """A restricted space (params and fixed values) as JSON types, to store with a study."""
    out: dict[str, Any] = {}
    for name, p in space.items():
        if isinstance(p, Float | Int):
            out[name] = {"type": type(p).__name__.lower(), "low": p.low, "high": p.high,
                         "log": p.log}
        elif isinstance(p, Categorical):
            out[name] = {"type": "categorical", "choices": list(p.choices)}
        else:
            out[name] = {"type": "fixed", "value": p}
        if getattr(p, "when", None) is not None:  # a declared space (listings); never stored
            out[name]["when"] = list(p.when)
    return out


def from_json(data: Mapping[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`to_json`."""
    out: dict[str, Any] = {}
    for name, d in data.items():
        when = tuple(d["when"]) if "when" in d else None
        if d["type"] == "float":
            out[name] = Float(d["low"], d["high"], d["log"], when)
        elif d["type"] == "int":
            out[name] = Int(d["low"], d["high"], d["log"], when)
        elif d["type"] == "categorical":
            out[name] = Categorical(tuple(d["choices"]), when)
        else:
            out[name] = d["value"]
    return out
