"""What the commands share: flags, the one-line usage errors, the terminal."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, NoReturn

from autometa.errors import ConfigError, one_line


class Parser(argparse.ArgumentParser):
    """argparse, with usage errors on one line (the README's promise for bad input)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"autometa: error: {one_line(message)} (see `{self.prog} --help`)\n")


def data_root_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-root", help="directory that relative input paths (CSV files, "
                                            "image folders, checkpoints) are under (default: "
                                            "the working directory)")


def cache_dir_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cache-dir", help="where decoded-image stores are cached (default: "
                                            "$AUTOMETA_CACHE_DIR, else $XDG_CACHE_HOME/"
                                            "autometa, else ~/.cache/autometa); `autometa "
                                            "cache` lists and clears it")


def plugin_option_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--plugin-option", action="append", default=[],
                        metavar="PLUGIN.KEY=VALUE",
                        help="a setting for a plugin's hooks or report format, e.g. "
                             "my-reporter.path=out.json (repeatable; VALUE is read as a TOML "
                             "value when it is one, else as text; wins over [plugins.PLUGIN] "
                             "in --config)")


def plugin_options(given: list[str]) -> dict[str, dict[str, Any]]:
    """``--plugin-option`` flags as ``{plugin: {key: value}}``; a VALUE that is a TOML
    value (``3``, ``true``, ``"a b"``, ``[1, 2]``) is read as one, anything else is text.

    Raises:
        ConfigError: a flag is not ``PLUGIN.KEY=VALUE``.
    """
    from autometa.config import tomllib

    out: dict[str, dict[str, Any]] = {}
    for text in given:
        key, eq, raw = text.partition("=")
        name, dot, setting = key.strip().partition(".")
        if not (eq and dot and name and setting):
            raise ConfigError(f"--plugin-option {text!r}: expected PLUGIN.KEY=VALUE, e.g. "
                              "my-reporter.path=out.json")
        try:
            value: Any = tomllib.loads(f"v = {raw.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw.strip()
        out.setdefault(name, {})[setting] = value
    return out


def keep_states(text: str) -> int | str:
    if text == "all":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'all' or a number, got {text!r}") from None


def report_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("autometa-reports"),
                        help="directory for the CSV and Markdown leaderboard")


def quiet_optuna() -> None:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # our own lines report trials


def console() -> Any:
    """stdout, as wide as the terminal or ``$COLUMNS``; a pipe or a CI log without
    ``$COLUMNS`` gets 200 columns (rows are not folded at 80 there)."""
    import os

    from rich.console import Console

    out = Console()
    return out if out.is_terminal or "COLUMNS" in os.environ else Console(width=200)


def plain(text: str) -> Any:
    from rich.text import Text

    return Text(text)  # no markup interpretation of user/plugin strings
