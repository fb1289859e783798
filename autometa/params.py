"""Declared parameter types: every plugin setting is parsed and checked at the edge.

A plugin's settings are the keyword parameters of its constructor, and their declared type
is the parameter's annotation (``trust_pickle: bool = False``, ``strategy: Literal["auto",
"vmap", "loop"] = "auto"``, ``path: str | os.PathLike[str] | None = None``). Before
anything is stored, the engine passes every value a user gave, whether fixed or a list of
choices, from a config file, a flag or Python, through :func:`parse`:

* values from Python and config files must already have the declared type (an integer
  where a float is declared is accepted; ``"no"`` where a bool is declared is not);
* values from the command line arrive as text (:class:`CliText`) and are parsed into the
  declared type: booleans accept ``true/false/1/0/yes/no`` in any case, numbers must be
  finite, text may not hold a NUL byte.

Anything else is a :class:`~autometa.errors.ConfigError` naming the parameter, what was
expected and what was given. This module imports neither torch nor Optuna.
"""

from __future__ import annotations

import math
import os
import typing
from collections.abc import Mapping, Sequence
from pathlib import PurePath
from types import NoneType, UnionType
from typing import Any, Literal, Union

from autometa.errors import ConfigError

#: Command-line spellings of booleans (compared in lower case).
#: Constructor arguments the engine supplies itself (a task's seed and device, an
#: algorithm's model and task), never users' settings: listings and the kit skip them.
ENGINE_ARGUMENTS = frozenset({"self", "model", "task", "seed", "device"})
#: A task's: also ``cache_dir`` (the machine's ``--cache-dir``, to a task that takes it).
TASK_ENGINE_ARGUMENTS = ENGINE_ARGUMENTS | {"cache_dir"}
TRUE_WORDS = frozenset({"true", "1", "yes"})
FALSE_WORDS = frozenset({"false", "0", "no"})


class CliText(str):
    """A value typed on the command line: text to parse into the declared type."""

    __slots__ = ()


class _Mismatch(Exception):
    """A value that does not fit one declared type (turned into a ConfigError by parse)."""


def declared_types(cls: Any, skip: frozenset[str] = frozenset()) -> dict[str, Any]:
    """``{parameter: annotation}`` for the keyword parameters of ``cls``'s constructor.

    A parameter without an annotation, or one whose annotation cannot be resolved, maps
    to ``Any`` (its values pass unchecked; the conformance kit flags it).
    """
    import inspect

    try:
        signature = inspect.signature(cls)
    except (TypeError, ValueError):
        return {}
    try:
        hints = typing.get_type_hints(getattr(cls, "__init__", cls))
    except Exception:  # a name only imported under TYPE_CHECKING, a typo in a string
        hints = {}
    return {name: hints.get(name, Any) for name, p in signature.parameters.items()
            if name not in skip and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}


def keyword_defaults(cls: Any) -> dict[str, Any]:
    """``{parameter: default}`` of the keyword parameters of ``cls``'s constructor that
    have a default."""
    import inspect

    try:
        signature = inspect.signature(cls)
    except (TypeError, ValueError):
        return {}
    return {name: p.default for name, p in signature.parameters.items()
            if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
            and p.default is not inspect.Parameter.empty}


def parse(key: str, declared: Any, value: Any) -> Any:
    """``value`` as the ``declared`` type (see the module docstring).

    Args:
        key: the setting's name in messages, e.g. ``"checkpoint.trust_pickle"``.
        declared: a type annotation (``bool``, ``int | None``, ``Literal[...]``, ...).
        value: the value given; a :class:`CliText` is parsed from text.

    Raises:
        ConfigError: the value does not have (or, from the command line, does not parse
            as) the declared type.
    """
    try:
        return _parse(declared, value)
    except _Mismatch:
        raise ConfigError(f"{key}: expected {describe(declared)}, got {_shown(value)}") from None


def _parse(tp: Any, value: Any) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any or tp is object:
        return _plain(value)
    if origin in (Union, UnionType):
        members = typing.get_args(tp)
        if value is None and NoneType in members:
            return None
        # Command-line text tries the typed members first, so "1" is 1 for `int | str`.
        ordered = sorted(members, key=lambda m: _is_text(m))
        for member in ordered:
            if member is NoneType:
                continue
            try:
                return _parse(member, value)
            except _Mismatch:
                continue
        raise _Mismatch
    if origin is typing.Annotated:
        return _parse(typing.get_args(tp)[0], value)
    if origin is Literal:
        return _choice(typing.get_args(tp), value)
    if tp is bool:
        return parse_bool(value)
    if tp is int:
        return _int(value)
    if tp is float:
        return _float(value)
    if _is_text(tp):
        return _text(value)
    if origin in (list, tuple, Sequence, typing.Sequence) or tp in (list, tuple):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis] or [Any]
        if isinstance(value, str) or not isinstance(value, list | tuple):
            raise _Mismatch
        return [_parse(args[0], v) for v in value]
    if origin in (dict, Mapping, typing.Mapping) or tp is dict:
        value_type = (typing.get_args(tp) or (str, Any))[1]
        if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
            raise _Mismatch
        return {str(k): _parse(value_type, v) for k, v in value.items()}
    if isinstance(tp, type):  # another class (e.g. torch.device): instances only
        if isinstance(value, CliText) or not isinstance(value, tp):
            raise _Mismatch
        return value
    return _plain(value)  # an annotation this module does not know: unchecked


def _is_text(tp: Any) -> bool:
    origin = typing.get_origin(tp) or tp
    return tp is str or (isinstance(origin, type) and issubclass(origin, os.PathLike | PurePath))


def is_path(tp: Any) -> bool:
    """True if ``tp`` declares a file path (``os.PathLike`` or ``pathlib`` among its types,
    e.g. ``str | os.PathLike[str] | None``): an input file the engine identifies by content
    and resolves against the data root."""
    origin = typing.get_origin(tp)
    if origin in (Union, UnionType):
        return any(is_path(m) for m in typing.get_args(tp))
    if origin is typing.Annotated:
        return is_path(typing.get_args(tp)[0])
    return tp is not str and _is_text(tp)


def parse_bool(value: Any) -> bool:
    """A bool, or from the command line one of ``true/false/1/0/yes/no`` (any case)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, CliText):
        word = value.strip().lower()
        if word in TRUE_WORDS:
            return True
        if word in FALSE_WORDS:
            return False
    raise _Mismatch


def _int(value: Any) -> int:
    if isinstance(value, CliText):
        try:
            return int(value.strip())
        except ValueError:
            raise _Mismatch from None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Mismatch
    return value


def _float(value: Any) -> float:
    if isinstance(value, CliText):
        try:
            value = float(value.strip())
        except ValueError:
            raise _Mismatch from None
    if isinstance(value, bool) or not isinstance(value, int | float) \
            or not math.isfinite(value):
        raise _Mismatch
    return float(value)


def _text(value: Any) -> str:
    if isinstance(value, PurePath):
        value = str(value)
    if not isinstance(value, str) or "\x00" in value:
        raise _Mismatch
    return str(value)  # a plain str, not CliText


def _choice(choices: Sequence[Any], value: Any) -> Any:
    for choice in choices:
        try:
            if type(choice) is bool:
                parsed: Any = parse_bool(value)
            elif isinstance(choice, int):
                parsed = _int(value)
            elif isinstance(choice, float):
                parsed = _float(value)
            else:
                parsed = _text(value)
        except _Mismatch:
            continue
        if type(parsed) is type(choice) and parsed == choice:
            return choice
    raise _Mismatch


def _plain(value: Any) -> Any:
    """An unchecked value; command-line text is read as a TOML value, else kept as text."""
    if isinstance(value, CliText):
        from autometa.config import tomllib

        try:
            return tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            return str(value)
    return value


def describe(tp: Any) -> str:
    """What a value of type ``tp`` is, for messages: ``true or false``, ``an integer``."""
    origin = typing.get_origin(tp)
    if origin in (Union, UnionType):
        parts = [describe(m) for m in typing.get_args(tp) if m is not NoneType]
        if "a file path" in parts:  # str | os.PathLike: a path, given as text
            parts = [p for p in parts if p != "text"]
        return " or ".join(dict.fromkeys(parts))
    if origin is typing.Annotated:
        return describe(typing.get_args(tp)[0])
    if origin is Literal:
        return "one of " + ", ".join(repr(c) for c in typing.get_args(tp))
    if tp is bool:
        return "true or false"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a finite number"
    if tp is str:
        return "text"
    if _is_text(tp):
        return "a file path"
    if origin in (list, tuple, Sequence, typing.Sequence) or tp in (list, tuple):
        args = typing.get_args(tp)
        return f"a list of {describe(args[0])} values" if args else "a list"
    if origin in (dict, Mapping, typing.Mapping) or tp is dict:
        return "a table of settings"
    return getattr(tp, "__name__", str(tp))


def _shown(value: Any) -> str:
    """``value`` for a message: text as typed, other values as their repr (one line)."""
    text = repr(str(value)) if isinstance(value, CliText) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def parse_settings(owner: str, cls: Any, values: Mapping[str, Any],
                   skip: frozenset[str] = frozenset()) -> dict[str, Any]:
    """Every value of ``values`` parsed as the declared type of ``cls``'s parameter.

    Names ``cls`` does not take are left for the caller to report (with the valid names).
    """
    types = declared_types(cls, skip)
    return {name: parse(f"{owner}.{name}", types[name], value) if name in types else value
            for name, value in values.items()}
