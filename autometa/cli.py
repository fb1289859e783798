"""The ``autometa`` command line: ``run``, ``worker``, ``plugins`` and ``leaderboard``.

All user-facing output lives here. Errors print one line and exit 2 (``--debug`` shows the
traceback). Imports of torch and Optuna are deferred to the commands that need them.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from autometa import __version__
from autometa.config import DEFAULT_STORAGE, SearchConfig, check_writable_dir, tomllib
from autometa.errors import AutometaError, ConfigError, one_line, redact
from autometa.params import CliText

if TYPE_CHECKING:
    from autometa.leaderboard import Leaderboard

#: ``autometa run`` flag -> SearchConfig field, for the flags given on the command line.
RUN_FLAGS = {
    "task": "task", "algorithms": "algorithms", "sources": "sources", "trials": "n_trials",
    "timeout": "timeout", "meta_steps": "meta_steps", "eval_every": "eval_every",
    "seed": "seed", "study": "study_name", "storage": "storage", "artifacts": "artifacts",
    "device": "device", "top_k": "top_k", "pruner": "pruner", "threads": "threads",
    "devices": "devices", "workers": "workers", "keep": "keep", "data_root": "data_root",
}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="autometa",
        description="AutoML meta-optimizer: searches meta-learning algorithms, source models "
                    "and their hyperparameters with Optuna, and ranks them on a leaderboard.",
    )
    parser.add_argument("--version", action="version", version=f"autometa {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run or resume a search",
                         description="Run a search from flags and/or a TOML/YAML config file "
                                     "(flags win). Re-running with the same study name resumes.")
    run.add_argument("--config", type=Path, help="TOML or YAML file of SearchConfig keys")
    run.add_argument("--task", help="task plugin name (see `autometa plugins`)")
    run.add_argument("--algorithms", help="comma-separated algorithm names (default: all)")
    run.add_argument("--sources", help="comma-separated source model names (default: all)")
    run.add_argument("--trials", type=int, help="trials to finish in the study (default 20)")
    run.add_argument("--timeout", type=float, help="stop starting trials after SECONDS")
    run.add_argument("--meta-steps", type=int, help="meta-training steps per trial (500)")
    run.add_argument("--eval-every", type=int, help="meta-val interval in steps (100)")
    run.add_argument("--seed", type=int, help="seed of the whole search (0)")
    run.add_argument("--study", help="study name (default: <task>-seed<seed>)")
    run.add_argument("--storage", help=f"Optuna storage URL (default {DEFAULT_STORAGE})")
    run.add_argument("--artifacts", help="where trained trial states go: a directory (one "
                                         "every machine mounts, for many) or s3://BUCKET "
                                         "(default autometa-artifacts)")
    run.add_argument("--keep", type=_keep, metavar="all|K",
                     help="trial states kept: all (default), or those of the best K on meta-val")
    _data_root_flag(run)
    run.add_argument("--device", help="torch device, e.g. cpu or cuda:0")
    run.add_argument("--devices", help="comma-separated devices, one trial per device at a "
                                       "time, e.g. cuda:0,cuda:1; 'cuda' = every visible GPU")
    run.add_argument("--workers", type=int,
                     help="trials at once, each in its own process (default: one per device; "
                          "e.g. 2 on a CPU)")
    run.add_argument("--top-k", type=int, help="best trials scored on meta-test (3)")
    run.add_argument("--threads", type=int,
                     help="torch CPU threads (default: torch's; 1 is fastest for small models)")
    run.add_argument("--pruner", choices=["median", "none"], help="trial pruning (median)")
    run.add_argument("--task-param", action="append", default=[], metavar="KEY=VALUE",
                     help="task parameter, e.g. shots=5 (repeatable)")
    run.add_argument("--param", action="append", default=[], metavar="PLUGIN.KEY=VALUE",
                     help="fix or restrict a hyperparameter, e.g. maml.inner_steps=1 or "
                          "maml.first_order=[true,false] (repeatable)")
    _report_flags(run)
    run.add_argument("--no-progress", action="store_true", help="no progress bars")

    worker = sub.add_parser(
        "worker", help="join a stored study from this machine and run its trials",
        description="Join study STUDY in the storage at --storage (e.g. a PostgreSQL server "
                    "that every machine reaches) and run its trials until its budget is "
                    "spent. The search's settings come from the storage; input files must "
                    "match the study's (by content hash).")
    worker.add_argument("study", help="study name (as `autometa run` created it)")
    worker.add_argument("--storage", required=True,
                        help="the study's storage URL, e.g. postgresql://user@host/db")
    worker.add_argument("--artifacts", help="the artifact store as this machine reaches it "
                                            "(default: the study's)")
    _data_root_flag(worker)
    worker.add_argument("--devices", help="comma-separated devices of this machine (default: "
                                          "the study's), e.g. cuda:0,cuda:1 or cuda")
    worker.add_argument("--workers", type=int, help="trials at once on this machine "
                                                    "(default: one per device)")
    worker.add_argument("--threads", type=int, help="torch CPU threads per worker")
    worker.add_argument("--timeout", type=float, help="stop starting trials after SECONDS")
    _report_flags(worker)
    worker.add_argument("--no-progress", action="store_true", help="no progress bars")

    plugins = sub.add_parser("plugins", help="list installed plugins and what they provide")
    plugins.add_argument("--verbose", "-v", action="store_true",
                         help="also import each entry and show its search space")

    board = sub.add_parser("leaderboard", help="show the leaderboard of a stored study")
    board.add_argument("study", help="study name")
    board.add_argument("--storage", default=DEFAULT_STORAGE, help="Optuna storage URL")
    board.add_argument("--top-k", type=int, help="best trials scored on meta-test")
    board.add_argument("--artifacts", help="the artifact store as this machine reaches it "
                                           "(default: the study's)")
    _data_root_flag(board)
    board.add_argument("--device", help="torch device to score on (default: the study's)")
    _report_flags(board)
    return parser


def _data_root_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-root", help="directory that relative input paths (CSV files, "
                                            "image folders, checkpoints) are under (default: "
                                            "the working directory)")


def _keep(text: str) -> int | str:
    if text == "all":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'all' or a number, got {text!r}") from None


def _report_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("autometa-reports"),
                        help="directory for the CSV and Markdown leaderboard")


class _Parser(argparse.ArgumentParser):
    """argparse, with usage errors on one line (the README's promise for bad input)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"autometa: error: {one_line(message)} (see `{self.prog} --help`)\n")


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
    commands = {"run": cmd_run, "worker": cmd_worker, "plugins": cmd_plugins,
                "leaderboard": cmd_leaderboard}
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


# -- run ---------------------------------------------------------------------------------
def config_from_args(args: argparse.Namespace, sources: Sequence[str] = ()) -> SearchConfig:
    """Merge the config file (if any) with the flags given; flags win.

    ``--param`` values go to ``source_params`` for the names in ``sources`` (the installed
    source models) or given with ``--sources``, else to ``algorithm_params``. Values stay
    text (:class:`~autometa.params.CliText`) until the engine parses them as their declared
    types, except ``[...]`` lists and ``{...}`` ranges, read as TOML.
    """
    settings: dict[str, Any] = {
        field: getattr(args, flag) for flag, field in RUN_FLAGS.items()
        if getattr(args, flag) is not None
    }
    if args.task_param:
        settings["task_params"] = dict(_key_value(p, "--task-param") for p in args.task_param)
    for name, key, value in (_plugin_param(p) for p in args.param):
        settings.setdefault("_params", []).append((name, key, value))
    extra = settings.pop("_params", [])
    if args.config:
        config = SearchConfig.from_file(args.config, **settings)
    else:
        if "task" not in settings:
            raise ConfigError("give --task NAME or --config FILE (see `autometa run --help`)")
        config = SearchConfig.from_dict(settings, where="command line")
    for name, key, value in extra:  # a plugin is an algorithm or a source; checked later
        is_source = name in config.sources or (name in sources and name not in config.algorithms)
        target = config.source_params if is_source else config.algorithm_params
        target.setdefault(name, {})[key] = value
    return config


def _key_value(text: str, flag: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"{flag} {text!r}: expected KEY=VALUE")
    return key.strip(), _parse_value(raw.strip())


def _plugin_param(text: str) -> tuple[str, str, Any]:
    key, value = _key_value(text, "--param")
    name, dot, param = key.partition(".")
    if not dot or not name or not param:
        raise ConfigError(f"--param {text!r}: expected PLUGIN.KEY=VALUE, e.g. maml.inner_steps=1")
    return name, param, value


def _parse_value(raw: str) -> Any:
    """``[a, b]`` a list and ``{low = .., high = ..}`` a table (TOML), else the text.

    The engine parses text as the parameter's declared type (``yes`` is true for a bool).
    A list that is not valid TOML (``[yes,no]``) is split on commas into texts.
    """
    if raw.startswith("{"):
        try:
            return tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{raw!r} is not a valid range table such as "
                              f"{{low = 0.01, high = 0.1}}: {exc}") from None
    if raw.startswith("[") and raw.endswith("]"):
        try:
            return tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            return [CliText(v.strip()) for v in raw[1:-1].split(",") if v.strip()]
    return CliText(raw)


def cmd_run(args: argparse.Namespace, ready: Callable[[], None]) -> int:
    from autometa.plugins import create_host

    host = create_host()
    config = config_from_args(args, sources=host.names("source"))
    check_writable_dir(args.out, "--out")
    from autometa.engine.run import run_search
    from autometa.progress import Progress, RichProgress

    _quiet_optuna()
    progress = Progress() if args.no_progress else RichProgress()
    board = run_search(config, host=host, progress=progress, ready=ready)
    _show(board, args.out)
    return 0


def cmd_worker(args: argparse.Namespace, ready: Callable[[], None]) -> int:
    from autometa.plugins import create_host

    check_writable_dir(args.out, "--out")
    from autometa.engine.run import join_search
    from autometa.progress import Progress, RichProgress

    _quiet_optuna()
    progress = Progress() if args.no_progress else RichProgress()
    board = join_search(args.study, args.storage, host=create_host(), progress=progress,
                        ready=ready, artifacts=args.artifacts, data_root=args.data_root,
                        devices=args.devices, workers=args.workers, threads=args.threads,
                        timeout=args.timeout)
    _show(board, args.out)
    return 0


def cmd_leaderboard(args: argparse.Namespace, ready: Callable[[], None]) -> int:
    from autometa.leaderboard import check_top_k, load_leaderboard

    if args.top_k is not None:
        check_top_k(args.top_k)
    check_writable_dir(args.out, "--out")
    _quiet_optuna()
    board = load_leaderboard(args.study, args.storage, top_k=args.top_k,
                             artifacts=args.artifacts, data_root=args.data_root,
                             device=args.device)
    ready()
    _show(board, args.out)
    return 0


def _quiet_optuna() -> None:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # our own lines report trials


def _show(board: Leaderboard, out: Path) -> None:
    from rich.table import Table

    arrow = "lower is better" if board.direction == "minimize" else "higher is better"
    counts = ", ".join(f"{v} {k}" for k, v in board.counts.items() if v)
    console = _console()
    # A narrow terminal (80 columns) lists each trial's hyperparameters under the table,
    # wrapped between "k=v" pairs: in a column they would be folded mid-number.
    beside = console.width >= WIDE_TABLE
    table = Table(title=f"{board.study_name}: {board.task}, {board.metric} ({arrow})",
                  caption=f"trials: {counts or 'none'}; ranked on meta-val, "
                          f"test = mean ± 95% CI over meta-test {board.ci_over}")
    columns = [c for c in board.display_columns() if beside or c != "params"]
    for column in columns:
        if column == "params":
            table.add_column(column, overflow="fold", ratio=1)
        else:  # a number or a name is never split: elided (…) if it cannot fit
            table.add_column(column, overflow="ellipsis", no_wrap=True)
    rows = board.display_rows()
    for row in rows:
        table.add_row(*(_plain(row[c]) for c in columns))
    console.print(table)
    if not beside and rows:
        console.print("hyperparameters (algorithm | source):", markup=False, highlight=False)
        for row in rows:
            console.print(_plain(f"{row['rank']:>4}. trial {row['trial']}: {row['params']}"))
    if board.counts.get("running"):
        console.print(f"{board.counts['running']} trial(s) still running in other processes: "
                      "this is a snapshot, and the last process to finish writes the reports",
                      markup=False, highlight=False)
        return
    if not board.report:
        console.print(f"the reports of these trials were already written, by the process "
                      "that finished the search, into its --out folder on its machine; "
                      f"`autometa leaderboard {board.study_name}` writes them here",
                      markup=False, highlight=False)
        return
    paths = board.write(out)
    console.print("wrote " + ", ".join(str(p) for p in paths), markup=False, highlight=False)


#: Terminal columns from which the leaderboard shows hyperparameters in the table.
WIDE_TABLE = 120


def _console() -> Any:
    """stdout, as wide as the terminal or ``$COLUMNS``; a pipe or a CI log without
    ``$COLUMNS`` gets 200 columns (rows are not folded at 80 there)."""
    import os

    from rich.console import Console

    console = Console()
    return console if console.is_terminal or "COLUMNS" in os.environ else Console(width=200)


def _plain(text: str) -> Any:
    from rich.text import Text

    return Text(text)  # no markup interpretation of user/plugin strings


# -- plugins -----------------------------------------------------------------------------
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
        table.add_row(_plain(info.name), _plain(dist), _plain(status), _plain(provides))
    console = _console()
    console.print(table)
    if args.verbose:
        _print_entries(console, host)
    for message in host.clashes():
        console.print(_plain(f"error: {message}"), style="red")
    return 0


def _print_entries(console: Any, host: Any) -> None:
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
        table.add_row(*(_plain(v) for v in (KINDS[reg.kind][1], reg.name, reg.plugin,
                                            reg.description, space)))
    console.print(table)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
