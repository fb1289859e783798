"""A busy neighbour: burn CPU (and optionally churn memory and disk) beside a test run.

The suite must pass on a machine that other jobs keep busy; its time limits
(tests/limits.py) are guards against hangs, never judgements of speed. This script is how
to check that: it starts ``--workers`` processes that spin in pure Python (default three
per core: the 1-minute load stays around 6-8 on a 2-core machine once the tests add
theirs), optionally each allocating and touching ``--memory-mb`` per round and one more
process writing, syncing and deleting ``--disk-mb`` in a loop, and prints the load average
every ``--interval`` seconds (to ``--log`` too, if given). It stops by itself after
``--seconds`` (at most 6 hours) or on SIGTERM or SIGINT, and leaves nothing running: each
child also stops when its own deadline passes or its parent is gone.

Usage, from the repository root::

    python tests/busy_neighbour.py --seconds 3600 --log /tmp/load.log & make test; kill $!
    python tests/busy_neighbour.py --workers 8 --memory-mb 200 --disk-mb 64 --seconds 600

It is not a test module (pytest collects only ``test_*.py``) and imports nothing but the
standard library.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

#: The longest run allowed: a forgotten neighbour must not burn a shared machine for days.
MAX_SECONDS = 6 * 3600
#: How often a child checks its deadline and its parent (it spins in between).
CHECK_EVERY = 0.05


def _still_wanted(deadline: float, parent: int) -> bool:
    return time.monotonic() < deadline and os.getppid() == parent


def _child_signals() -> None:
    """SIGTERM ends a child at once (a forked child inherits the parent's handler), and a
    terminal's Ctrl-C is the parent's to handle."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _burn(deadline: float, parent: int, memory_bytes: int) -> None:
    """Spin on one core until ``deadline`` or the parent is gone; churn memory if asked."""
    _child_signals()
    x = 1
    while _still_wanted(deadline, parent):
        round_end = time.monotonic() + CHECK_EVERY
        while time.monotonic() < round_end:
            for _ in range(10_000):
                x = (x * 31 + 7) % 1_000_003
        if memory_bytes:
            block = bytearray(memory_bytes)
            block[::4096] = b"\1" * len(range(0, memory_bytes, 4096))  # touch every page
            del block


def _churn_disk(deadline: float, parent: int, folder: str, disk_bytes: int) -> None:
    """Write, sync and delete a file of ``disk_bytes`` in ``folder`` until ``deadline``."""
    _child_signals()
    chunk = os.urandom(1 << 20)
    path = Path(folder) / f"churn-{os.getpid()}"
    while _still_wanted(deadline, parent):
        with open(path, "wb") as f:
            for _ in range(max(1, disk_bytes // len(chunk))):
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        path.unlink()
        time.sleep(0.2)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text}")
    return value


def _seconds(text: str) -> float:
    value = float(text)
    if not 0 < value <= MAX_SECONDS:
        raise argparse.ArgumentTypeError(
            f"expected seconds in (0, {MAX_SECONDS}] (at most 6 hours), got {text}")
    return value


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    cores = os.cpu_count() or 1
    parser = argparse.ArgumentParser(
        description="Burn CPU (and optionally memory and disk) beside a test run; print the "
                    "load average; stop after --seconds or on SIGTERM/SIGINT.")
    parser.add_argument("--workers", type=_positive_int, default=3 * cores,
                        help=f"CPU-burning processes (default 3 per core: {3 * cores})")
    parser.add_argument("--seconds", type=_seconds, default=3600.0,
                        help=f"stop after this long (default 3600, at most {MAX_SECONDS})")
    parser.add_argument("--interval", type=float, default=10.0,
                        help="seconds between load-average lines (default 10)")
    parser.add_argument("--memory-mb", type=int, default=0,
                        help="MiB each worker allocates, touches and frees per round "
                             "(default 0: none)")
    parser.add_argument("--disk-mb", type=int, default=0,
                        help="MiB one extra process writes, syncs and deletes in a loop "
                             "(default 0: none)")
    parser.add_argument("--dir", default=None,
                        help="where the disk churn writes (default: the system temp folder)")
    parser.add_argument("--log", type=Path, default=None,
                        help="also append the load-average lines to this file")
    return parser.parse_args(argv)


def _report(line: str, log: TextIO | None) -> None:
    print(line, flush=True)
    if log is not None:
        log.write(line + "\n")
        log.flush()


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    stopping: list[str] = []

    def stop(signum: int, _frame: object) -> None:
        stopping.append(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)

    start = time.monotonic()
    deadline = start + args.seconds
    parent = os.getpid()
    folder = tempfile.mkdtemp(prefix="busy-neighbour-", dir=args.dir) if args.disk_mb else None
    children = [multiprocessing.Process(target=_burn, daemon=True,
                                        args=(deadline, parent, args.memory_mb << 20))
                for _ in range(args.workers)]
    if folder is not None:
        children.append(multiprocessing.Process(target=_churn_disk, daemon=True,
                                                args=(deadline, parent, folder,
                                                      args.disk_mb << 20)))
    log = open(args.log, "a") if args.log is not None else None
    loads: list[float] = []
    try:
        for child in children:
            child.start()
        _report(f"busy-neighbour: pid {parent}, {args.workers} CPU workers"
                f"{f', {args.memory_mb} MiB memory churn each' if args.memory_mb else ''}"
                f"{f', {args.disk_mb} MiB disk churn in {folder}' if folder else ''}"
                f", for {args.seconds:.0f} s on {os.cpu_count()} cores", log)
        next_line = start
        while not stopping and time.monotonic() < deadline:
            now = time.monotonic()
            if now >= next_line:
                one, five, fifteen = os.getloadavg()
                loads.append(one)
                _report(f"{time.strftime('%H:%M:%S')} +{now - start:6.0f} s  "
                        f"load {one:5.2f} {five:5.2f} {fifteen:5.2f}", log)
                next_line += args.interval
            time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
    finally:
        for child in children:
            if child.is_alive():
                child.terminate()
        for child in children:
            child.join(10)
            if child.is_alive():
                child.kill()
                child.join()
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
        why = stopping[0] if stopping else "time is up"
        summary = (f"busy-neighbour: stopped ({why}) after {time.monotonic() - start:.0f} s; "
                   f"1-minute load min {min(loads):.2f}, mean {sum(loads) / len(loads):.2f}, "
                   f"max {max(loads):.2f} over {len(loads)} samples" if loads else
                   f"busy-neighbour: stopped ({why})")
        _report(summary, log)
        if log is not None:
            log.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
