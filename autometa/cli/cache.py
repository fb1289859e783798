"""``autometa cache``: where decoded-image stores and frozen features are cached, what is
there, clearing it."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from autometa.cache import cache_dir, clear, stores
from autometa.cli.common import cache_dir_flag
from autometa.errors import ConfigError


def add_parsers(sub: Any) -> None:
    """``cache``."""
    parser = sub.add_parser(
        "cache", help="list or clear the decoded-image stores and stored frozen features",
        description="Image tasks decode their images once per machine into a store in the "
                    "cache directory; the baselines' frozen networks embed the evaluation "
                    "examples once per (source, weights, data) into a feature store beside "
                    "it ('features of <source>'); every later run and every worker process "
                    "reads them. Everything here can be rebuilt from the data: clearing it "
                    "only costs the next run the decoding and embedding.")
    parser.add_argument("action", nargs="?", choices=("list", "clear"), default="list",
                        help="list (default): the stores and their sizes; clear: delete them")
    cache_dir_flag(parser)


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def cmd_cache(args: argparse.Namespace, ready: Callable[[], None]) -> int:
    root = cache_dir(args.cache_dir)
    if root.exists() and not root.is_dir():
        raise ConfigError(f"cache directory {str(root)!r} is a file, not a directory; give a "
                          "directory with --cache-dir DIR")
    ready()
    if args.action == "clear":
        count, freed = clear(root)
        print(f"removed {count} store(s), {_size(freed)}, from {root}")
        return 0
    listed = stores(root)
    print(f"cache directory: {root}" + ("" if Path(root).is_dir() else " (not created yet)"))
    for store in listed:
        shape = "x".join(map(str, store.shape)) or "?"
        state = "" if store.complete else "  (partial: rebuilt when next needed)"
        print(f"  {store.name}  {store.dataset}  {shape}  {store.resize}  "
              f"{_size(store.bytes)}{state}")
    total = sum(s.bytes for s in listed)
    print(f"{len(listed)} store(s), {_size(total)}; `autometa cache clear` deletes them")
    return 0
