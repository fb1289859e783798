"""The ``autometa`` command: its parser, the log gate, and ``main`` (errors as one line)."""

from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import Sequence

from autometa import __version__
from autometa.cli import plugins, results, search
from autometa.cli.common import Parser
from autometa.errors import AutometaError, one_line, redact


def build_parser() -> Parser:
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
    return parser


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
    parser = build_parser()
    args = parser.parse_args(argv)
    gate = _LogGate()
    root = logging.getLogger()
    level = root.level
    root.addHandler(gate)
    root.setLevel(logging.DEBUG if args.debug else logging.WARNING)
    if args.debug:
        gate.release()
    commands = {"run": search.cmd_run, "worker": search.cmd_worker,
                "plugins": plugins.cmd_plugins, "leaderboard": results.cmd_leaderboard,
                "report": results.cmd_report, "predict": results.cmd_predict,
                "export": results.cmd_export}
    try:
        with warnings.catch_warnings():
            logging.captureWarnings(True)  # torch/library warnings go through the gate too
            try:
                code = commands[args.command](args, gate.release)
            finally:
                logging.captureWarnings(False)
        gate.release()
        return code
    except AutometaError as exc:
        if args.debug:
            raise
        print(f"autometa: error: {redact(one_line(str(exc)))}", file=sys.stderr)
        return 2
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
    finally:
        root.removeHandler(gate)
        root.setLevel(level)
