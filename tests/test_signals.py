"""SIGTERM and SIGHUP stop a search as Ctrl-C does: every worker stops, the trials in flight
are failed as interrupted and queued again, the exit code is the shell's for the signal,
and the results commands then describe the study as it is. A worker whose supervisor is
killed stops too. Real ``autometa`` processes, real signals (as SLURM, Kubernetes and
systemd send them, or a terminal that closes)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from limits import QUICK_SUBPROCESS, STOPPED_PROCESS, TRIAL_START
from optuna.trial import FrozenTrial, TrialState
from stored_trials import stored_trials

#: Every test here runs CLI searches with worker processes: slow.
pytestmark = pytest.mark.slow

STUDY = "sinusoid-seed0"
#: Trials that outlast every test (so the ones in flight are known), on tiny evaluations.
ENDLESS = ["run", "--task", "sinusoid", "--algorithms", "maml", "--sources", "mlp",
           "--trials", "6", "--meta-steps", "10000000", "--eval-every", "5000000",
           "--top-k", "1", "--no-progress", "--pruner", "none", "--threads", "1",
           "--task-param", "val_episodes=4", "--task-param", "test_episodes=4",
           "--task-param", "eval_queries=5"]


def _cli(*args: str, cwd: Path) -> subprocess.Popen[str]:
    """``autometa ARGS`` as the leader of a process group of its own (its workers join it)."""
    return subprocess.Popen([sys.executable, "-m", "autometa", *args], cwd=cwd,
                            env={**os.environ, "COLUMNS": "200"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def _in_flight(db: Path, proc: subprocess.Popen[str], workers: int) -> list[FrozenTrial]:
    """Once ``workers`` trials run at once, each with its plan sampled: those trials."""
    end = time.monotonic() + TRIAL_START
    while time.monotonic() < end:
        assert proc.poll() is None, proc.communicate()
        running = [t for t in stored_trials(db) if t.state == TrialState.RUNNING
                   and "worker" in t.user_attrs and "source_params" in t.user_attrs]
        if len(running) == workers:
            return running
        time.sleep(0.3)
    raise AssertionError(f"no {workers} trials running after {TRIAL_START} s: a hang")


def _left(group: int) -> list[psutil.Process]:
    """The live (not zombie) processes of process group ``group``."""
    left = []
    for p in psutil.process_iter(["status"]):
        try:
            if os.getpgid(p.pid) == group and p.info["status"] != psutil.STATUS_ZOMBIE:
                left.append(p)
        except (ProcessLookupError, psutil.Error):
            continue
    return left


def _none_left(group: int) -> None:
    """Wait until no process of ``group`` is left (the resource tracker of
    ``multiprocessing`` may take a moment after its parent's end)."""
    end = time.monotonic() + STOPPED_PROCESS
    while _left(group):
        if time.monotonic() > end:
            raise AssertionError(f"left running: {[p.cmdline() for p in _left(group)]}")
        time.sleep(0.2)


def _interrupted_and_queued(trials: list[FrozenTrial], numbers: list[int], why: str,
                            running: tuple[int, ...] = ()) -> None:
    """Each of trials ``numbers`` failed as interrupted by ``why``, with one queued copy
    of its parameters; no trial is left RUNNING but those numbered ``running``."""
    assert [t.number for t in trials if t.state == TrialState.RUNNING] == list(running)
    for number in numbers:
        t = trials[number]
        assert t.state == TrialState.FAIL and t.user_attrs["crash"].startswith(
            f"interrupted ({why}"), (t.state, t.user_attrs.get("crash"))
        copies = [c for c in trials if c.system_attrs.get("failed_trial") == number]
        assert len(copies) == 1 and copies[0].state == TrialState.WAITING
        assert copies[0].params == t.params


@pytest.mark.parametrize("to", ["supervisor", "group"])
def test_sigterm_stops_every_worker_and_queues_their_trials(tmp_path, to):
    """SIGTERM to the supervisor alone (as Kubernetes sends it to a container's first
    process), or to every process (SLURM, systemd): before, its busy workers ran on (or
    died with their trials left RUNNING), and the results said "still running"."""
    db = tmp_path / "autometa.db"
    proc = _cli(*ENDLESS, "--workers", "2", cwd=tmp_path)
    running = _in_flight(db, proc, workers=2)
    workers = {t.user_attrs["worker"]["pid"] for t in running}
    assert len(workers) == 2 and proc.pid not in workers
    if to == "group":
        os.killpg(proc.pid, signal.SIGTERM)
    else:
        os.kill(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=STOPPED_PROCESS)
    assert proc.returncode == 143, (out, err)
    # The supervisor's own signal, or a worker's that ended first ("SIGTERM to worker 1").
    [line] = err.strip().splitlines()  # one line, from the supervisor alone
    assert line.startswith("autometa: stopped by SIGTERM"), line
    assert line.endswith("; re-run the same command to resume"), line
    _none_left(proc.pid)
    assert not any(psutil.pid_exists(pid) and psutil.Process(pid).status()
                   != psutil.STATUS_ZOMBIE for pid in workers)
    _interrupted_and_queued(stored_trials(db), [t.number for t in running], "SIGTERM")

    board = subprocess.run([sys.executable, "-m", "autometa", "leaderboard", STUDY],
                           cwd=tmp_path, capture_output=True, text=True,
                           timeout=QUICK_SUBPROCESS)
    assert board.returncode == 0, board.stderr
    assert "still running" not in board.stdout
    # Counted as interrupted, not failed: nothing went wrong in them.
    assert "trials: 2 interrupted;" in board.stdout  # was "trials: 2 failed;"
    assert "2 interrupted trial(s) queued to run again" in board.stdout
    assert "wrote autometa-reports" in board.stdout
    assert (tmp_path / "autometa-reports" / f"{STUDY}.csv").is_file()


def test_sighup_stops_a_single_process_search_with_129(tmp_path):
    """SIGHUP (the terminal closed) to the whole process group of a one-worker search
    (the trial runs in the process itself); `autometa report` then shows the trial as
    failed and queued, not as running."""
    db = tmp_path / "autometa.db"
    proc = _cli(*ENDLESS, cwd=tmp_path)
    [running] = _in_flight(db, proc, workers=1)
    assert running.user_attrs["worker"]["pid"] == proc.pid
    os.killpg(proc.pid, signal.SIGHUP)
    out, err = proc.communicate(timeout=STOPPED_PROCESS)
    assert proc.returncode == 129, (out, err)
    assert err.strip().splitlines() == [
        "autometa: stopped by SIGHUP; re-run the same command to resume"]
    _none_left(proc.pid)
    _interrupted_and_queued(stored_trials(db), [running.number], "SIGHUP")

    report = subprocess.run([sys.executable, "-m", "autometa", "report", STUDY], cwd=tmp_path,
                            capture_output=True, text=True, timeout=QUICK_SUBPROCESS)
    assert report.returncode == 0, report.stderr
    html = (tmp_path / "autometa-reports" / f"{STUDY}.html").read_text()
    assert "still running" not in html
    assert "interrupted (SIGHUP); queued to run again (resume the search)" in html
    assert "<span>1 interrupted</span>" in html and "<span>0 failed</span>" in html


def test_workers_stop_when_their_supervisor_is_killed(tmp_path):
    """``kill -9`` of the supervisor: no orphan keeps computing. Each worker sees its
    supervisor end, fails its trial (queued again) and exits."""
    db = tmp_path / "autometa.db"
    proc = _cli(*ENDLESS, "--workers", "2", cwd=tmp_path)
    running = _in_flight(db, proc, workers=2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=STOPPED_PROCESS)
    _none_left(proc.pid)
    _interrupted_and_queued(stored_trials(db), [t.number for t in running],
                            "SIGTERM: its supervising process ended")


def test_sigterm_stops_a_joined_worker_and_leaves_the_search_running(tmp_path):
    """`autometa worker` (one worker, in its own process) joining a search: SIGTERM fails
    its trial as interrupted, queued again, and exits 143; the search it joined runs on."""
    db = tmp_path / "autometa.db"
    search = _cli(*ENDLESS, cwd=tmp_path)
    [first] = _in_flight(db, search, workers=1)
    worker = _cli("worker", STUDY, "--storage", "sqlite:///autometa.db", "--artifacts",
                  "autometa-artifacts", "--threads", "1", "--no-progress", cwd=tmp_path)
    try:
        joined = next(t for t in _in_flight(db, worker, workers=2) if t.number != first.number)
        assert joined.user_attrs["worker"]["pid"] == worker.pid
        worker.send_signal(signal.SIGTERM)
        out, err = worker.communicate(timeout=STOPPED_PROCESS)
        assert worker.returncode == 143, (out, err)
        trials = stored_trials(db)
        assert trials[first.number].state == TrialState.RUNNING and search.poll() is None
        _interrupted_and_queued(trials, [joined.number], "SIGTERM", running=(first.number,))
    finally:
        os.killpg(search.pid, signal.SIGTERM)
        search.communicate(timeout=STOPPED_PROCESS)
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.communicate(timeout=STOPPED_PROCESS)
    assert search.returncode == 143
