"""The ``autometa`` command: its parser, the log gate, and ``main`` (errors as one line)."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any

from autometa.cli import cache, launch, plugins, proxy, results, search
from autometa.cli.common import Parser
from autometa.engine.signals import Interrupted, stop_on_signals
from autometa.errors import AutometaError, one_line, redact
from autometa.launch import STORAGE_ENV
from autometa.version import __version__

#: autometa's own commands -> their handlers (a plugin's command cannot take these names).
COMMANDS: dict[str, Callable[[argparse.Namespace, Callable[[], None]], int]] = {
    "run": search.cmd_run, "worker": search.cmd_worker,
    "requirements": search.cmd_requirements, "plugins": plugins.cmd_plugins,
    "leaderboard": results.cmd_leaderboard, "report": results.cmd_report,
    "predict": results.cmd_predict, "export": results.cmd_export,
    "new-plugin": plugins.cmd_new_plugin, "cache": cache.cmd_cache,
    "launch": launch.cmd_launch,
    "storage-proxy": proxy.cmd_storage_proxy,
}


def build_parser(argv: Sequence[str] | None = None) -> Parser:
    """The ``autometa`` parser, with the commands plugins register (``register_commands``).

    A plugin's command is imported only when ``argv`` runs it; listing it in ``--help``
    needs only its name and description.
    """
    parser = Parser(
        prog="autometa",
        description="AutoML meta-optimizer: searches meta-learning algorithms, source models "
                    "and their hyperparameters with Optuna, and ranks them on a leaderboard.",
    )
    parser.add_argument("--version", action="version", version=f"autometa {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    search.add_parsers(sub)
    plugins.add_parsers(sub)
    results.add_parsers(sub)
    cache.add_parsers(sub)
    launch.add_parsers(sub)
    proxy.add_parsers(sub)
    _plugin_commands(sub, list(sys.argv[1:] if argv is None else argv))
    return parser


#: Handlers of the plugin commands added to the parser last built, by name.
_PLUGIN_HANDLERS: dict[str, Callable[[argparse.Namespace], int]] = {}


def _plugin_commands(sub: Any, argv: list[str]) -> None:
    """Add each plugin's command; the one ``argv`` runs is loaded and adds its arguments."""
    from autometa.plugins import create_host

    _PLUGIN_HANDLERS.clear()
    invoked = next((a for a in argv if not a.startswith("-")), None)
    quiet = logging.getLogger("autometa.plugins")
    was, quiet.disabled = quiet.disabled, True  # broken plugins: the command's own host says
    try:  # a plugin printing at import must not spoil a command's output (plugins --json)
        with contextlib.redirect_stdout(sys.stderr):
            host = create_host()
    finally:
        quiet.disabled = was
    for name in host.names("command"):
        reg = host.get("command", name)
        if name in COMMANDS:
            logging.getLogger(__name__).warning(
                "command %r from plugin %s is not added: autometa has a command of that name",
                name, reg.origin)
            continue
        parser = sub.add_parser(name, help=f"{reg.description or 'a command'} "
                                           f"(plugin {reg.plugin})")
        if name == invoked:
            factory = reg.load()
            with reg.guard("raised while adding its arguments"):
                handler = factory(parser)
            if not callable(handler):
                from autometa.errors import PluginError

                raise PluginError(f"command {name!r} from plugin {reg.origin}: its factory "
                                  f"returned {type(handler).__name__}; expected "
                                  "handler(args) -> exit status")

            def run(args: argparse.Namespace, handler: Any = handler, reg: Any = reg) -> int:
                with reg.guard("raised"):
                    code = handler(args)
                return int(code or 0)

            _PLUGIN_HANDLERS[name] = run


class _LogGate(logging.Handler):
    """Holds log records (and Python warnings) until the command's inputs are known good.

    A bad input then prints exactly one line; once the search starts, records flow to
    stderr as they come, and held ones first.
    """

    def __init__(self) -> None:
        super().__init__()
        self.held: list[logging.LogRecord] = []
        self.open = False
        self.out = logging.StreamHandler(sys.stderr)
        self.out.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        self.out.addFilter(_redact_record)

    def emit(self, record: logging.LogRecord) -> None:
        if self.open:
            self.out.handle(record)
        else:
            self.held.append(record)

    def release(self) -> None:
        self.open = True
        for record in self.held:
            self.out.handle(record)
        self.held.clear()


def _redact_record(record: logging.LogRecord) -> bool:
    """Credentials never reach a log line: URL passwords become ``***``."""
    record.msg, record.args = redact(record.getMessage()), None
    return True


def main(argv: Sequence[str] | None = None) -> int:
    gate = _LogGate()
    root = logging.getLogger()
    level = root.level
    root.addHandler(gate)
    try:
        return _main(argv, gate)
    finally:
        root.removeHandler(gate)
        root.setLevel(level)


def _main(argv: Sequence[str] | None, gate: _LogGate) -> int:
    root = logging.getLogger()
    try:
        parser = build_parser(argv)
    except AutometaError as exc:  # a plugin's command failed to load or add its arguments
        print(f"autometa: error: {redact(one_line(str(exc)))}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    if getattr(args, "storage", "") is None:  # every --storage: $AUTOMETA_STORAGE when not given
        args.storage = os.environ.get(STORAGE_ENV) or getattr(args, "storage_default", None)
    root.setLevel(logging.DEBUG if args.debug else logging.WARNING)
    if args.debug:
        gate.release()
    try:
        # SIGTERM (schedulers) and SIGHUP (a closed terminal) stop a command as Ctrl-C does.
        with warnings.catch_warnings(), stop_on_signals():
            logging.captureWarnings(True)  # torch/library warnings go through the gate too
            try:
                if args.command in COMMANDS:
                    code = COMMANDS[args.command](args, gate.release)
                else:  # a plugin's: its own output, from the start
                    gate.release()
                    code = _PLUGIN_HANDLERS[args.command](args)
            finally:
                logging.captureWarnings(False)
        gate.release()
        return code
    except AutometaError as exc:
        if args.debug:
            raise
        print(f"autometa: error: {redact(one_line(str(exc)))}", file=sys.stderr)
        return 2
    except Interrupted as exc:
        print(f"autometa: stopped by {exc.why}; re-run the same command to resume",
              file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("autometa: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.debug:
            raise
        print(f"autometa: error: internal error: {type(exc).__name__}: "
              f"{redact(one_line(str(exc)))[:300]} (re-run with --debug for the traceback, "
              "and please report it)", file=sys.stderr)
        return 1
