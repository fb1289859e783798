"""The ``autometa`` command line: ``run``, ``plugins`` and ``leaderboard``.

All user-facing output lives here. Errors print one line and exit 2 (``--debug`` shows the
traceback). Imports of torch and Optuna are deferred to the commands that need them.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from autometa import __version__
from autometa.config import DEFAULT_STORAGE, SearchConfig, tomllib
from autometa.errors import AutometaError, ConfigError

if TYPE_CHECKING:
    from autometa.leaderboard import Leaderboard

#: ``autometa run`` flag -> SearchConfig field, for the flags given on the command line.
RUN_FLAGS = {
    "task": "task", "algorithms": "algorithms", "sources": "sources", "trials": "n_trials",
    "timeout": "timeout", "meta_steps": "meta_steps", "eval_every": "eval_every",
    "seed": "seed", "study": "study_name", "storage": "storage", "artifacts": "artifacts",
    "device": "device", "top_k": "top_k", "pruner": "pruner", "threads": "threads",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
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
    run.add_argument("--artifacts", help="directory of trained trial states")
    run.add_argument("--device", help="torch device, e.g. cpu or cuda:0")
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

    plugins = sub.add_parser("plugins", help="list installed plugins and what they provide")
    plugins.add_argument("--verbose", "-v", action="store_true",
                         help="also import each entry and show its search space")

    board = sub.add_parser("leaderboard", help="show the leaderboard of a stored study")
    board.add_argument("study", help="study name")
    board.add_argument("--storage", default=DEFAULT_STORAGE, help="Optuna storage URL")
    board.add_argument("--top-k", type=int, help="best trials scored on meta-test")
    _report_flags(board)
    return parser


def _report_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("autometa-reports"),
                        help="directory for the CSV and Markdown leaderboard")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    commands = {"run": cmd_run, "plugins": cmd_plugins, "leaderboard": cmd_leaderboard}
    try:
        return commands[args.command](args)
    except AutometaError as exc:
        if args.debug:
            raise
        print(f"autometa: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("autometa: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130


# -- run ---------------------------------------------------------------------------------
def config_from_args(args: argparse.Namespace) -> SearchConfig:
    """Merge the config file (if any) with the flags given; flags win."""
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
        target = config.source_params if name in config.sources else config.algorithm_params
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
    """A TOML value (number, bool, list, quoted string), or the raw text as a string."""
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def cmd_run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    from autometa.progress import Progress, RichProgress
    from autometa.study import run_search

    _quiet_optuna()
    progress = Progress() if args.no_progress else RichProgress()
    board = run_search(config, progress=progress)
    _show(board, args.out)
    return 0


def cmd_leaderboard(args: argparse.Namespace) -> int:
    from autometa.leaderboard import load_leaderboard

    _quiet_optuna()
    board = load_leaderboard(args.study, args.storage, top_k=args.top_k)
    _show(board, args.out)
    return 0


def _quiet_optuna() -> None:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # our own lines report trials


def _show(board: Leaderboard, out: Path) -> None:
    from rich.table import Table

    arrow = "lower is better" if board.direction == "minimize" else "higher is better"
    counts = ", ".join(f"{v} {k}" for k, v in board.counts.items() if v)
    table = Table(title=f"{board.study_name}: {board.task}, {board.metric} ({arrow})",
                  caption=f"trials: {counts or 'none'}; ranked on meta-val, "
                          f"test = mean ± 95% CI over meta-test {board.ci_over}")
    for column in board.display_columns():
        wide = column == "params"
        table.add_column(column, overflow="fold", no_wrap=not wide, ratio=1 if wide else None)
    for row in board.display_rows():
        table.add_row(*(_plain(v) for v in row.values()))
    console = _console()
    console.print(table)
    paths = board.write(out)
    console.print("wrote " + ", ".join(str(p) for p in paths), markup=False, highlight=False)


def _console() -> Any:
    """stdout; when it is not a terminal (a pipe, a CI log) rows are not folded at 80 columns."""
    from rich.console import Console

    console = Console()
    return console if console.is_terminal else Console(width=200)


def _plain(text: str) -> Any:
    from rich.text import Text

    return Text(text)  # no markup interpretation of user/plugin strings


# -- plugins -----------------------------------------------------------------------------
def cmd_plugins(args: argparse.Namespace) -> int:
    from rich.table import Table

    from autometa.plugins import KINDS, create_host

    host = create_host()
    table = Table(title="autometa plugins")
    for column in ("plugin", "distribution", "status", "provides"):
        table.add_column(column, overflow="fold")
    for name, info in sorted(host.plugins.items()):
        dist = f"{info.distribution} {info.version}" if info.distribution else "in-process"
        provides = ", ".join(f"{KINDS[r.kind][1]} {r.name}" for r in info.provides)
        plugin = host.pm.get_plugin(name)
        hooks = [h.name for h in host.pm.get_hookcallers(plugin) or []] if plugin else []
        lifecycle = [h for h in hooks if h not in {hook for hook, _ in KINDS.values()}]
        if lifecycle:
            provides = ", ".join(filter(None, [provides, "hooks " + ", ".join(lifecycle)]))
        status = info.status if info.status != "broken" else f"broken: {info.error}"
        table.add_row(_plain(name), _plain(dist), _plain(status), _plain(provides))
    console = _console()
    console.print(table)
    if args.verbose:
        _print_entries(console, host)
    for message in host.clashes():
        console.print(_plain(f"error: {message}"), style="red")
    return 0


def _print_entries(console: Any, host: Any) -> None:
    from rich.table import Table

    from autometa.plugins import KINDS
    from autometa.space import describe

    table = Table(title="entries")
    for column in ("kind", "name", "from", "description", "parameters / search space"):
        table.add_column(column, overflow="fold")
    for reg in host.registrations():
        try:
            cls = reg.load()
            space = describe(cls.params if reg.kind == "task" else cls.search_space())
        except AutometaError as exc:
            space = f"unavailable: {exc}"
        table.add_row(*(_plain(v) for v in (KINDS[reg.kind][1], reg.name, reg.plugin,
                                            reg.description, space)))
    console.print(table)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
