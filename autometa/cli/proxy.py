"""``autometa storage-proxy``: serve a database storage to many workers over gRPC."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any

from autometa.errors import ConfigError, redact
from autometa.launch import STORAGE_ENV


def add_parsers(sub: Any) -> None:
    """``storage-proxy``."""
    parser = sub.add_parser(
        "storage-proxy", help="serve a database storage to many workers over gRPC",
        description="Serves the Optuna storage at URL (postgresql://..., mysql://... or "
                    "sqlite:///path.db) through Optuna's gRPC storage proxy, with autometa's "
                    "budget lock and heartbeats beside it. Workers, `run`, `leaderboard` "
                    "and every other command then take --storage grpc://HOST:PORT: they "
                    "hold one gRPC connection each instead of ~3 database connections. "
                    "Needs pip install 'autometa-ml[grpc]'. Ctrl-C or SIGTERM stops it.")
    parser.add_argument("url", metavar="URL", nargs="?",
                        help="the database storage to serve (default: $AUTOMETA_STORAGE: the "
                             "password stays off the command line)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (127.0.0.1; 0.0.0.0 for every interface: "
                             "the proxy has no authentication, keep it on a private network)")
    parser.add_argument("--port", type=int, default=13000,
                        help="port to listen on (13000; 0: any free port, printed)")
    parser.add_argument("--threads", type=int, default=1024,
                        help="calls served at once (1024): each worker waiting for the budget's "
                             "lock holds one; beyond, workers retry after a pause")


def cmd_storage_proxy(args: argparse.Namespace, ready: Callable[[], None]) -> int:
    from autometa.cli.common import quiet_optuna
    from autometa.engine.proxy import Proxy
    from autometa.engine.signals import Interrupted

    quiet_optuna()
    if args.threads < 2:
        raise ConfigError(f"--threads: expected at least 2, got {args.threads}")
    url = args.url or os.environ.get(STORAGE_ENV)
    if not url:
        raise ConfigError(f"give the storage to serve: URL, or set {STORAGE_ENV}")
    proxy = Proxy(url, host=args.host, port=args.port, threads=args.threads)
    print(f"serving {redact(url)} on {proxy.address} (workers: --storage "
          f"{proxy.address}; Ctrl-C stops it)", flush=True)
    ready()
    try:
        proxy.wait()
    except KeyboardInterrupt as exc:
        why = exc.why if isinstance(exc, Interrupted) else "Ctrl-C"
        proxy.stop()
        print(f"storage-proxy: stopped by {why}", file=sys.stderr)
    return 0
