"""``autometa plugins``: what is installed, what each plugin provides, what is broken."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from autometa.cli.common import console, plain
from autometa.errors import AutometaError


def add_parsers(sub: Any) -> None:
    """``plugins``."""
    plugins = sub.add_parser("plugins", help="list installed plugins and what they provide")
    plugins.add_argument("--verbose", "-v", action="store_true",
                         help="also import each entry and show its search space")


def cmd_plugins(args: argparse.Namespace, ready: Callable[[], None]) -> int:
    from rich.table import Table

    from autometa.plugins import KINDS, create_host

    host = create_host()
    table = Table(title="autometa plugins")
    for column in ("plugin", "distribution", "status", "provides"):
        table.add_column(column, overflow="fold")
    # One row per plugin: keys are unique even when two distributions share a name.
    for key, info in sorted(host.plugins.items(), key=lambda item: (item[1].name, item[0])):
        dist = f"{info.distribution} {info.version}" if info.distribution else "in-process"
        provides = ", ".join(f"{KINDS[r.kind][1]} {r.name}" for r in info.provides)
        plugin = host.pm.get_plugin(key)
        hooks = [h.name for h in host.pm.get_hookcallers(plugin) or []] if plugin else []
        lifecycle = [h for h in hooks if h not in {hook for hook, _ in KINDS.values()}]
        if lifecycle:
            provides = ", ".join(filter(None, [provides, "hooks " + ", ".join(lifecycle)]))
        status = f"{info.status}: {info.error}" if info.error else info.status
        table.add_row(plain(info.name), plain(dist), plain(status), plain(provides))
    out = console()
    out.print(table)
    if args.verbose:
        _print_entries(out, host)
    for message in host.clashes():
        out.print(plain(f"error: {message}"), style="red")
    return 0


def _print_entries(out: Any, host: Any) -> None:
    from rich.table import Table

    from autometa.plugins import KINDS, describe_error
    from autometa.space import describe

    table = Table(title="entries")
    for column in ("kind", "name", "from", "description", "parameters / search space"):
        table.add_column(column, overflow="fold")
    for reg in host.registrations():
        try:  # plugin code runs here: any failure is this entry's cell, never a traceback
            space = describe(reg.declared())
        except AutometaError as exc:
            space = f"broken: {exc}"
        except Exception as exc:  # describe() of a malformed space
            space = f"broken: invalid search space: {describe_error(exc)}"
        table.add_row(*(plain(v) for v in (KINDS[reg.kind][1], reg.name, reg.plugin,
                                            reg.description, space)))
    out.print(table)
