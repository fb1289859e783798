"""Timing and reporting shared by every benchmark in this folder.

* the machine a result was measured on: :func:`environment` (hardware, versions, commit,
  load average, command line), :func:`describe_environment` (one line of it), and its parts
  :func:`cpu_model`, :func:`git_commit`, :func:`load_average`;
* timing: :func:`tasks_per_second` (one repetition, ``time.perf_counter``), :func:`interleave`
  (repetitions of several contenders, in a rotated order, so that a slow spell of the
  machine hits them all) and :func:`paired_ratio` (the median of same-repetition ratios);
  on a CUDA device, :func:`synchronizer` waits for its queued kernels before each clock
  read (CUDA runs asynchronously: without it a timer measures the launches only);
* reporting: :func:`ratio`, :func:`text_table`, :func:`markdown_table`, :func:`write_results`
  (``<name>.json`` and ``<name>.md`` under :data:`RESULTS` or ``--out``),
  :func:`print_and_write`, :func:`stderr_log`.

The benchmarks import it as ``harness``: run as scripts, their folder is on ``sys.path``.
It imports torch only inside :func:`environment`, so a benchmark's ``--help`` stays fast.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence, Sized
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

#: Where every benchmark writes its results unless told otherwise (``--out``).
RESULTS = Path(__file__).resolve().parent / "results"
#: Distributions whose versions every result records (a missing one as None).
VERSIONED = ("torch", "autometa", "higher", "torchopt", "learn2learn", "numpy")


# --------------------------------------------------------------------------- the machine


def cpu_model() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo), else what ``platform`` knows."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return cpu


def git_commit(*, mark_dirty: bool = True) -> str | None:
    """The repository's short commit, ``+dirty`` if the work tree has changes; None off git."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, check=True).stdout.strip()
        if mark_dirty:
            dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain"],
                                   capture_output=True, text=True, check=True).stdout.strip()
            commit += "+dirty" if dirty else ""
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit


def load_average() -> float | None:
    """The machine's 1-minute load average (None where the OS has none)."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def versions(dists: Sequence[str]) -> dict[str, str | None]:
    """Installed version of each distribution, None where it is not installed."""
    found: dict[str, str | None] = {}
    for dist in dists:
        try:
            found[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            found[dist] = None
    return found


def environment(extra_versions: Sequence[str] = ()) -> dict[str, Any]:
    """Hardware and versions, recorded with every result (``extra_versions``: more dists)."""
    import torch

    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        # The first visible GPU and the CUDA torch was built for (None on a CPU build).
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average_1m": load_average(),
        "autometa_commit": git_commit(),
        "versions": versions([*VERSIONED, *extra_versions]),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }


def describe_environment(env: dict[str, Any]) -> str:
    """One line of :func:`environment`'s record, for a report's header."""
    v = env["versions"]
    peers = ", ".join(f"{k} {v[k] or 'not installed'}"
                      for k in ("higher", "torchopt", "learn2learn"))
    gpu = f"{env['gpu']} (CUDA {env['cuda']}), " if env.get("gpu") else ""
    return (f"{gpu}{env['cpu']}, {env['cores']} cores, torch {v['torch']} ({env['torch_threads']} "
            f"threads), Python {env['python']}; {peers}; autometa {env['autometa_commit']}; "
            f"load average at start {env['load_average_1m']:.2f}; {env['date']}")


# --------------------------------------------------------------------------- timing


def synchronizer(device: Any) -> Callable[[], None]:
    """What to call before reading a clock so that the time includes ``device``'s work:
    ``torch.cuda.synchronize(device)`` on a CUDA device, nothing on a CPU."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def tasks_per_second(step: Callable[[Any], Any], batches: Sequence[Sized],
                     min_seconds: float = 0.0, sync: Callable[[], None] | None = None
                     ) -> float:
    """One timed repetition: ``step`` on every batch, again until ``min_seconds`` passed.

    A fast contender would otherwise be timed over a few milliseconds, where the machine's
    noise decides. ``sync`` is called before every clock read (:func:`synchronizer`).
    Returns tasks (episodes of the batches run) per second.
    """
    sync = sync or (lambda: None)
    tasks = sum(len(b) for b in batches)
    sync()
    start, done = time.perf_counter(), 0
    while True:
        for batch in batches:
            step(batch)
        done += tasks
        sync()
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return done / elapsed


def interleave(steps: Mapping[str, Callable[[Any], Any]], batches: Sequence[Sized],
               repeats: int, *, min_seconds: float = 0.0,
               after: Callable[[int, dict[str, list[float]]], None] | None = None,
               sync: Callable[[], None] | None = None) -> dict[str, list[float]]:
    """Tasks per second of each step per repetition, repetitions interleaved.

    In repetition ``rep`` every step runs :func:`tasks_per_second` once, in the order of
    ``steps`` rotated by ``rep`` (with two steps: A B, B A, A B, ...), so that a drift of
    the machine's speed spreads over all. ``after(rep, rates)`` runs after each repetition;
    ``sync`` before each clock read (:func:`tasks_per_second`).
    """
    keys = list(steps)
    rates: dict[str, list[float]] = {k: [] for k in keys}
    for rep in range(repeats):
        shift = rep % len(keys) if keys else 0
        for key in keys[shift:] + keys[:shift]:
            rates[key].append(tasks_per_second(steps[key], batches, min_seconds, sync))
        if after is not None:
            after(rep, rates)
    return rates


def paired_ratio(a: Sequence[float], b: Sequence[float]) -> float:
    """Median over repetitions of ``a`` over ``b`` in the same repetition (paired)."""
    return statistics.median([x / y for x, y in zip(a, b, strict=True)])


# --------------------------------------------------------------------------- reporting


def ratio(x: float | None, none: str = "–") -> str:
    """A ratio as ``1.23x``; ``none`` where there is none."""
    return none if x is None else f"{x:.2f}x"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def text_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A terminal table: the first column left-aligned, the others right-aligned."""
    cells = [list(map(str, headers))] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    out = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                     for i, (c, w) in enumerate(zip(r, widths, strict=True))) for r in cells]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


def write_results(name: str, payload: dict[str, Any], markdown: str, out: Path,
                  indent: int = 2) -> list[Path]:
    """Write ``<out>/<name>.json`` and ``<out>/<name>.md``; return the paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.json", out / f"{name}.md"]
    paths[0].write_text(json.dumps(payload, indent=indent, default=str) + "\n")
    paths[1].write_text(markdown.rstrip() + "\n")
    return paths


def print_and_write(name: str, payload: dict[str, Any], text: str, markdown: str,
                    out: Path) -> list[Path]:
    """Print ``text``, write the result files (:func:`write_results`) and say where."""
    print(text)
    paths = write_results(name, payload, markdown, out)
    for path in paths:
        print(f"wrote {path}")
    return paths


def stderr_log(quiet: bool = False) -> Callable[[str], None]:
    """A progress logger: each message on stderr, flushed; nothing when ``quiet``."""

    def log(msg: str) -> None:
        if not quiet:
            print(msg, file=sys.stderr, flush=True)

    return log
