"""Resident memory of a process tree, sampled from Linux's /proc while it runs.

:func:`run_sampled` starts a command and, a few times a second until it ends, reads for
it and every descendant (worker processes spawned by the engine included):

* ``/proc/PID/status``: ``VmRSS`` = ``RssAnon`` (private memory: the heap, tensors) +
  ``RssFile`` (file pages mapped: shared libraries and the image store) + ``RssShmem``;
* ``/proc/PID/smaps_rollup``: ``Pss`` (resident memory with shared pages divided among the
  processes that map them);
* ``/proc/PID/smaps`` (once a second, it is slower to read): the resident pages of the
  image store's mapping (``*.u8``), so that ``RssFile`` splits into store and libraries.

Each process keeps the peak of every field (kB in /proc, MB here, 1 MB = 2**20 bytes)
and its role: the command itself, a ``worker`` (a process the engine spawned:
``multiprocessing.spawn``), the ``resource-tracker``, or ``other``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

STATUS = ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmHWM")
ROLLUP = ("Pss", "Pss_Anon", "Pss_File")
#: Suffix of the mapped file whose resident pages are counted apart (the image store).
STORE_SUFFIX = ".u8"


def _fields(path: str, names: Sequence[str]) -> dict[str, float]:
    """The ``name: N kB`` lines of a /proc file, in MB."""
    out: dict[str, float] = {}
    with open(path) as handle:
        for line in handle:
            key, _, rest = line.partition(":")
            if key in names:
                out[key] = int(rest.split()[0]) / 1024
    return out


def store_rss_mb(pid: int, suffix: str = STORE_SUFFIX) -> float:
    """Resident MB of the mappings of files ending in ``suffix`` (0 if none)."""
    total, inside = 0.0, False
    with open(f"/proc/{pid}/smaps") as handle:
        for line in handle:
            head = line.split(maxsplit=1)[0]
            if not head.endswith(":"):  # a mapping's header line: "addr-addr perms ... path"
                inside = line.rstrip().endswith(suffix)
            elif inside and head == "Rss:":
                total += int(line.split()[1]) / 1024
    return total


def status_mb(pid: int | str = "self") -> dict[str, float]:
    """This process's (or ``pid``'s) /proc status and smaps_rollup fields, MB."""
    return {**_fields(f"/proc/{pid}/status", STATUS),
            **_fields(f"/proc/{pid}/smaps_rollup", ROLLUP)}


def _children() -> dict[int, list[int]]:
    """Every process's children, from /proc/*/stat."""
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                stat = handle.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])  # the name may hold spaces
        tree.setdefault(ppid, []).append(int(entry))
    return tree


def descendants(root: int) -> list[int]:
    tree, found, todo = _children(), [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += tree.get(pid, [])
    return found


def role(pid: int, root: int) -> str:
    if pid == root:
        return "main"
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return "other"
    if "resource_tracker" in cmdline:
        return "resource-tracker"
    if "multiprocessing.spawn" in cmdline or "spawn_main" in cmdline:
        return "worker"
    return "other"


class Sampler:
    """Peaks of :data:`STATUS`, :data:`ROLLUP` and the store's pages per process of a tree."""

    def __init__(self, root: int, interval: float = 0.25, store_every: float = 1.0) -> None:
        self.root, self.interval, self.store_every = root, interval, store_every
        self.processes: dict[int, dict[str, Any]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        last_store = 0.0
        while not self._stop.is_set():
            now = time.monotonic()
            with_store = now - last_store >= self.store_every
            last_store = now if with_store else last_store
            for pid in descendants(self.root):
                self._sample(pid, with_store)
            self._stop.wait(self.interval)

    def _sample(self, pid: int, with_store: bool) -> None:
        try:
            values = status_mb(pid)
            if with_store:
                values["store_rss"] = store_rss_mb(pid)
        except (OSError, ValueError, IndexError):  # the process ended, or is a zombie
            return
        if "RssAnon" not in values:  # a zombie: status without memory lines
            return
        record = self.processes.get(pid)
        if record is None:
            record = self.processes[pid] = {"pid": pid, "role": role(pid, self.root),
                                            "samples": 0, "peak": {}, "at_peak_anon": {}}
        record["samples"] += 1
        peak = record["peak"]
        if values["RssAnon"] > peak.get("RssAnon", -1.0):
            record["at_peak_anon"] = dict(values)
        for key, value in values.items():
            peak[key] = max(peak.get(key, value), value)
        # Memory beyond the shared store: everything resident but the store's own pages.
        if "store_rss" in values:
            beyond = values["VmRSS"] - values["store_rss"]
            peak["beyond_store"] = max(peak.get("beyond_store", beyond), beyond)

    def summary(self) -> list[dict[str, Any]]:
        """One row per process seen, the command first, then by role and pid; workers
        numbered in the order they started."""
        rows = sorted(self.processes.values(),
                      key=lambda r: (r["role"] != "main", r["role"], r["pid"]))
        workers = 0
        for row in rows:
            if row["role"] == "worker":
                workers += 1
                row["name"] = f"worker {workers}"
            else:
                row["name"] = row["role"]
        return rows


def run_sampled(command: Sequence[str], *, log: Path, env: Mapping[str, str] | None = None,
                interval: float = 0.25, timeout: float | None = None) -> dict[str, Any]:
    """Run ``command`` (stdout and stderr to ``log``) while sampling its process tree.

    Returns the wall time, the exit code, the last line of stdout (a JSON result, for the
    benchmark's own child processes) and :meth:`Sampler.summary`.
    """
    start = time.perf_counter()
    with open(log, "w") as out:
        process = subprocess.Popen(list(command), stdout=subprocess.PIPE, stderr=out,
                                   text=True, env=dict(env) if env is not None else None)
        with Sampler(process.pid, interval) as sampler:
            stdout, _ = process.communicate(timeout=timeout)
        out.write(stdout)
    wall = time.perf_counter() - start
    lines = stdout.strip().splitlines()
    return {"command": list(command), "wall_s": wall, "returncode": process.returncode,
            "last_line": lines[-1] if lines else "", "processes": sampler.summary(),
            "log": str(log)}


def floor(python: str = sys.executable) -> dict[str, float]:
    """Memory of a bare ``import torch, autometa`` process (MB): the least a worker holds."""
    code = ("import json, torch, autometa, sys; sys.path.insert(0, sys.argv[1]); "
            "from data_scale_memory import status_mb; print(json.dumps(status_mb()))")
    import json

    done = subprocess.run([python, "-c", code, str(Path(__file__).resolve().parent)],
                          capture_output=True, text=True, check=True)
    values: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return values


class PeakWatcher:
    """This process's RssAnon read every ``interval`` s in a thread: :meth:`take` gives the
    peak (MB) since the last call, so that a stage's transient peak is seen, not only
    what is left at its end."""

    def __init__(self, interval: float = 0.02) -> None:
        self.interval, self.peak = interval, 0.0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _now(self) -> float:
        return _fields("/proc/self/status", ("RssAnon",))["RssAnon"]

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            value = self._now()
            with self._lock:
                self.peak = max(self.peak, value)

    def take(self) -> float:
        value = self._now()
        with self._lock:
            peak, self.peak = max(self.peak, value), value
        return peak

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
