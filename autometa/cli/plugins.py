"""``autometa plugins``: what is installed, what each plugin provides, what is broken.

``--verbose`` adds a table of entries with each constructor setting (its type, its default
or ``required``, whether it is searched); ``--json`` prints all of it as one JSON document
for tools. Both import every entry to read its settings, so plugin code runs: a failure is
that entry's ``broken`` status and one-line error, never a traceback.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from autometa.cli.common import console, plain
from autometa.errors import AutometaError

if TYPE_CHECKING:
    from autometa.plugins import PluginHost, PluginInfo, Registration

#: The type shown for a declared name that the constructor does not take (a plugin bug the
#: conformance kit reports).
NOT_A_SETTING = "not a constructor setting"
#: A task's trial_params: not constructor settings, yet given in task_params.
PER_TRIAL = "per trial, fixed or searched as an algorithm's"
#: Longest default shown in the --verbose table (a repr can be pages long).
MAX_DEFAULT = 60


def add_parsers(sub: Any) -> None:
    """``plugins`` and ``new-plugin``."""
    from autometa.scaffold import TEMPLATE_KINDS

    new = sub.add_parser(
        "new-plugin", help="write a plugin package to start from (entry point and tests)",
        description="Write DIR/autometa-NAME: a Python package registering NAME under the "
                    "autometa entry-point group, with tests that run the conformance kit "
                    "and a tiny search. Then: pip install -e DIR/autometa-NAME[test] && "
                    "pytest DIR/autometa-NAME. Kinds: " + "; ".join(
                        f"{k}: {v}" for k, v in TEMPLATE_KINDS.items()))
    new.add_argument("name", help="the plugin's name: lowercase letters, digits and dashes, "
                                  "e.g. my-task")
    new.add_argument("--kind", required=True, choices=list(TEMPLATE_KINDS),
                     help="what the plugin provides")
    new.add_argument("--dir", type=Path, default=Path("."),
                     help="where to write the package folder (default: here)")
    plugins = sub.add_parser("plugins", help="list installed plugins and what they provide")
    plugins.add_argument("--verbose", "-v", action="store_true",
                         help="also import each entry and show its settings (type, default "
                              "or 'required', searched or not) and search space")
    plugins.add_argument("--json", action="store_true",
                         help="print one JSON document instead of tables: every plugin, its "
                              "status, hooks and entries with their settings and search "
                              "spaces (implies --verbose; warnings go to stderr)")


def cmd_plugins(args: argparse.Namespace, ready: Callable[[], None]) -> int:
    from autometa.plugins import create_host

    if args.json:
        return _print_json()
    host = create_host()
    out = console()
    out.print(_plugins_table(host))
    if args.verbose:
        out.print(_entries_table(host))
    for message in host.clashes():
        out.print(plain(f"error: {message}"), style="red")
    return 0


# -- what a plugin and an entry are, read once for the tables and the JSON -----------------
class _Setting(NamedTuple):
    """One constructor setting of an entry, or a declared name the constructor lacks."""

    name: str
    type: str  # human text from autometa.params.describe
    default: Any  # meaningless when required
    required: bool
    declared: Any  # its Float/Int/Categorical (or fixed value) in the space, or None


def _lifecycle_hooks(host: PluginHost, key: str) -> list[str]:
    """Hooks the plugin implements besides the registration hooks."""
    from autometa.plugins import KINDS

    plugin = host.pm.get_plugin(key)
    hooks = [h.name for h in host.pm.get_hookcallers(plugin) or []] if plugin else []
    registering = {hook for hook, _ in KINDS.values()}
    return [h for h in hooks if h not in registering]


def _sorted_plugins(host: PluginHost) -> list[tuple[str, PluginInfo]]:
    # Keys are unique even when two distributions share a name.
    return sorted(host.plugins.items(), key=lambda item: (item[1].name, item[0]))


def _inspect(reg: Registration) -> tuple[Mapping[str, Any], list[_Setting]]:
    """The entry's declared space (a task's ``params``) and its constructor settings (a
    task's ``trial_params`` too).

    Raises:
        AutometaError: loading, the space or the signature failed (a one-line message).
    """
    import inspect

    from autometa.params import ENGINE_ARGUMENTS, TASK_ENGINE_ARGUMENTS, declared_types, describe

    space = reg.declared()
    factory = reg.load()
    with reg.guard("could not be inspected"):
        engine = TASK_ENGINE_ARGUMENTS if reg.kind == "task" else ENGINE_ARGUMENTS
        types = declared_types(factory, skip=engine)  # {} if it has no signature
        parameters: Mapping[str, inspect.Parameter] = (
            inspect.signature(factory).parameters if types else {})
        settings = []
        for name, declared in types.items():
            default = parameters[name].default
            required = default is inspect.Parameter.empty
            settings.append(_Setting(name, "any value" if declared is Any else describe(declared),
                                    None if required else default, required, space.get(name)))
        settings += [_Setting(str(name), NOT_A_SETTING, None, False, p)
                     for name, p in space.items() if name not in types]
        if reg.kind == "task":
            settings += [_Setting(str(name), PER_TRIAL, getattr(factory, name, None), False, p)
                         for name, p in getattr(factory, "trial_params", {}).items()]
    return space, settings


# -- --json ------------------------------------------------------------------------------
def _print_json() -> int:
    import contextlib
    import json
    import sys

    from autometa.plugins import create_host
    from autometa.version import __version__

    # Plugin code that prints at import (or in search_space()) must not spoil the document.
    with contextlib.redirect_stdout(sys.stderr):
        host = create_host()
        document = {
            "autometa": __version__,
            "plugins": [_plugin_json(host, key, info) for key, info in _sorted_plugins(host)],
            "clashes": host.clashes(),
        }
    sys.stdout.write(json.dumps(jsonable(document), indent=2, allow_nan=False) + "\n")
    return 0


def _plugin_json(host: PluginHost, key: str, info: PluginInfo) -> dict[str, Any]:
    return {
        "name": info.name,
        "distribution": info.distribution,
        "version": info.version,
        "status": info.status,
        "error": info.error,
        "kinds": sorted({reg.kind for reg in info.provides}),
        "hooks": _lifecycle_hooks(host, key),
        "provides": [entry_json(reg) for reg in info.provides],
    }


def entry_json(reg: Registration) -> dict[str, Any]:
    """One entry; ``search_space`` and ``parameters`` are null for kinds without them."""
    from autometa.plugins import DECLARING, describe_error
    from autometa.space import to_json

    entry: dict[str, Any] = {"kind": reg.kind, "name": reg.name,
                             "description": reg.description, "status": "ok", "error": None,
                             "search_space": None, "parameters": None}
    if reg.kind not in DECLARING:  # a pruner, a report format: listed, not imported
        return entry
    try:
        space, settings = _inspect(reg)
        with reg.guard("has an invalid search space"):
            search_space = to_json(space)
    except AutometaError as exc:  # plugin code failed: this entry's status, never a traceback
        entry.update(status="broken", error=describe_error(exc))
        return entry
    entry["search_space"] = search_space
    entry["parameters"] = [
        {"name": s.name, "type": s.type, "default": s.default, "required": s.required,
         "searched": reg.kind != "task" and s.declared is not None}
        for s in settings
    ]
    return entry


def jsonable(value: Any) -> Any:
    """``value`` with only JSON types: tuples become lists, inf and nan strings, keys
    strings, and anything else its repr, so that ``json.dumps(allow_nan=False)`` never
    fails on what a plugin declared."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, Mapping):
        return {k if isinstance(k, str) else repr(k): jsonable(v) for k, v in value.items()}
    return repr(value)


# -- tables ------------------------------------------------------------------------------
def _plugins_table(host: PluginHost) -> Any:
    from rich.table import Table

    from autometa.plugins import KINDS

    table = Table(title="autometa plugins")
    for column in ("plugin", "distribution", "status", "provides"):
        table.add_column(column, overflow="fold")
    for key, info in _sorted_plugins(host):
        dist = f"{info.distribution} {info.version}" if info.distribution else "in-process"
        provides = ", ".join(f"{KINDS[r.kind][1]} {r.name}" for r in info.provides)
        lifecycle = _lifecycle_hooks(host, key)
        if lifecycle:
            provides = ", ".join(filter(None, [provides, "hooks " + ", ".join(lifecycle)]))
        status = f"{info.status}: {info.error}" if info.error else info.status
        table.add_row(plain(info.name), plain(dist), plain(status), plain(provides))
    return table


def _entries_table(host: PluginHost) -> Any:
    from rich.table import Table

    from autometa.plugins import DECLARING, KINDS, describe_error

    table = Table(title="entries")
    for column in ("kind", "name", "from", "description"):
        table.add_column(column, overflow="fold")
    # One line per setting: give them the room, fold the descriptions instead.
    table.columns[-1].max_width = 50
    table.add_column("parameters / search space", overflow="fold")
    for reg in host.registrations():
        if reg.kind not in DECLARING:
            cell = ""
        else:
            try:  # plugin code runs here: any failure is this entry's cell, never a traceback
                settings = _inspect(reg)[1]
                with reg.guard("has an invalid search space"):
                    cell = "\n".join(_setting_line(reg.kind, s) for s in settings)
            except AutometaError as exc:
                cell = f"broken: {describe_error(exc)}"
        table.add_row(*(plain(str(v)) for v in (KINDS[reg.kind][1], reg.name, reg.plugin,
                                                 reg.description, cell)))
    return table


def _setting_line(kind: str, setting: _Setting) -> str:
    """``inner_lr in [0.001, 0.5] log (searched): a finite number, default 0.01``.

    A declared range leads, as the column's title says; a task's ``params`` are ranges its
    settings are checked against, never searched.
    """
    from autometa.space import condition

    head = setting.name
    if setting.declared is not None:
        searched = f" (searched{condition(setting.declared)})"
        head += f" in {_range(setting.declared)}{'' if kind == 'task' else searched}"
    if setting.type == NOT_A_SETTING:
        return f"{head}: {NOT_A_SETTING}"
    if setting.required:
        return f"{head}: {setting.type}, required"
    default = repr(setting.default)
    if len(default) > MAX_DEFAULT:
        default = default[: MAX_DEFAULT - 3] + "..."
    return f"{head}: {setting.type}, default {default}"


def _range(declared: Any) -> str:
    from autometa.space import Categorical, Float, Int

    if isinstance(declared, Categorical):
        return "{" + ", ".join(map(repr, declared.choices)) + "}"
    if isinstance(declared, Float | Int):
        return f"[{declared.low}, {declared.high}]{' log' if declared.log else ''}"
    return f"{{{declared!r}}} (a fixed value)"


def cmd_new_plugin(args: argparse.Namespace, ready: Callable[[], None]) -> int:
    from autometa.errors import ConfigError
    from autometa.plugins import create_host
    from autometa.scaffold import new_plugin

    host = create_host()
    taken = [f"plugin {args.name!r}"] if args.name in host.plugins else []
    taken += [f"{r.kind} {r.name!r} of plugin {r.plugin!r}" for r in host.registrations()
              if r.name == args.name]
    if taken:  # a second entry point or registration of one name disables both
        raise ConfigError(f"{taken[0]} is installed already; choose another name (a second "
                          f"one would leave both unusable)")
    root = new_plugin(args.name, args.kind, args.dir)
    ready()
    print(f"wrote {root}")
    print(f"next: pip install -e '{root}[test]' && pytest '{root}'")
    return 0
