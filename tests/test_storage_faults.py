"""A storage that cannot be written is one line and exit code 2, at the first write that
fails, and nothing is left half-made (issue 25); an outage is still waited for, boundedly.

The faults are real: a SQLite file that is read-only (``chmod`` for a user, a read-only bind
mount for root, whom ``chmod`` does not stop), a 1 MiB tmpfs filled to the last byte (a full
disk), tables stamped by another Optuna version. Mounts are made in a mount namespace of
the command's own (``unshare``), so none outlives it; the command lists what it left on the
small disk before the namespace goes.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import shlex
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import pytest
import sqlalchemy.exc
from bad_input_cases import run_argv
from limits import CLI_SEARCH, QUICK_SUBPROCESS

from autometa.cli import main
from autometa.engine.lock import storage_lock
from autometa.engine.outage import Outage, StorageUnavailable, is_storage_error
from autometa.study.storage import lasting_fault

ROOT = os.geteuid() == 0
#: How a command gets a mount namespace of its own: root directly, a user through a user
#: namespace (where the kernel allows it).
UNSHARE = ["unshare", "--mount"] if ROOT else ["unshare", "--user", "--map-root-user",
                                               "--mount"]


def can_mount() -> bool:
    """True if a tmpfs can be mounted in a namespace of its own here."""
    if shutil.which("unshare") is None:
        return False
    try:
        return subprocess.run([*UNSHARE, "sh", "-c", "mount -t tmpfs tmpfs /mnt"],
                              capture_output=True, timeout=QUICK_SUBPROCESS).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


needs_mount = pytest.mark.skipif(not can_mount(), reason="needs util-linux's unshare and the "
                                 "right to mount a tmpfs in a namespace (root, or user "
                                 "namespaces enabled)")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def autometa(argv: list[str], cwd: Path, *, before: str = "", after: str = ""
             ) -> tuple[int | None, list[str]]:
    """Run the console script ``autometa argv`` in a shell, between shell commands
    ``before`` (``set -e``: mounts) and ``after``, in a mount namespace of its own when
    either is given; the exit code (None if it hung) and stderr's non-empty lines."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTOMETA_")}
    env.update(COLUMNS="200", OMP_NUM_THREADS="1")
    command = shlex.join([sys.executable, "-m", "autometa.cli", *argv])
    script = (f"set -e; {before}\nset +e; {command} 2> {shlex.quote(str(cwd / 'err'))}; "
              f"code=$?; {after}\nexit $code")
    prefix = UNSHARE if before or after else []
    try:
        done = subprocess.run([*prefix, "sh", "-c", script], cwd=cwd, env=env,
                              capture_output=True, text=True, timeout=CLI_SEARCH)
    except subprocess.TimeoutExpired:
        return None, ["<timed out: a hang>"]
    assert not done.stderr.strip(), f"the shell around autometa failed: {done.stderr}"
    lines = [line for line in (cwd / "err").read_text().splitlines() if line.strip()]
    return done.returncode, lines


def with_flag(argv: list[str], flag: str, value: str) -> list[str]:
    """``argv`` with ``flag``'s value replaced."""
    argv = list(argv)
    argv[argv.index(flag) + 1] = value
    return argv


def one_error_line(code: int | None, lines: list[str], *words: str) -> None:
    """Exit code 2 and one line ``autometa: error: ...`` naming one of ``words``."""
    shown = " | ".join(line[:300] for line in lines[:5])
    assert code == 2, f"exit code {code}: {shown}"
    assert len(lines) == 1 and lines[0].startswith("autometa: error:"), shown
    assert any(w.lower() in lines[0].lower() for w in words), shown


def trials(db: Path, study: str) -> list[tuple[int, str, str | None]]:
    """``(number, state, crash reason)`` of each trial of ``study``, read with sqlite3."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as c:
        rows = c.execute(
            "SELECT t.number, t.state, a.value_json FROM trials t "
            "JOIN studies s ON s.study_id = t.study_id "
            "LEFT JOIN trial_user_attributes a ON a.trial_id = t.trial_id AND a.key = 'crash' "
            "WHERE s.study_name = ? ORDER BY t.number", (study,)).fetchall()
    return [(n, state, crash) for n, state, crash in rows]


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A storage ``s.db`` holding study ``base`` (one finished trial), made once."""
    d = tmp_path_factory.mktemp("made")
    assert main(run_argv(d, study="base")) == 0
    return d / "s.db"


def test_a_read_only_sqlite_file_stops_a_resume_in_one_line(made, tmp_path):
    """The issue's run alternated 'unreachable' and 'reachable again' for ever; now the first
    write that fails (claiming a trial) is one line, exit 2, and the file is unchanged."""
    db = tmp_path / "s.db"
    shutil.copy(made, db)
    before = sha256(db)
    argv = with_flag(run_argv(tmp_path, study="base"), "--trials", "3")  # trials to run
    if ROOT:  # chmod does not stop root: a read-only bind mount of the file does
        if not can_mount():
            pytest.skip("root, and no way to mount the file read-only (unshare, mount)")
        q = shlex.quote(str(db))
        code, lines = autometa(argv, tmp_path,
                               before=f"mount --bind {q} {q}; mount -o remount,bind,ro {q}; "
                                      f"if touch -c {q}; then exit 97; fi 2>/dev/null")
    else:
        db.chmod(0o444)
        code, lines = autometa(argv, tmp_path)
        db.chmod(0o644)

    one_error_line(code, lines, "readonly", "read-only")
    assert sha256(db) == before
    assert trials(db, "base") == trials(made, "base")


@needs_mount
def test_a_full_artifact_disk_stops_the_search_and_a_resume_runs_the_trial(tmp_path):
    """Every trial failed with 'No space left on device' and the run exited 0 with an empty
    leaderboard; now the first state that cannot be written stops it: one line, exit 2,
    the trial failed with the reason and queued again, no half-written file in the store."""
    disk = tmp_path / "disk"
    disk.mkdir()
    argv = with_flag(with_flag(run_argv(tmp_path, study="full"), "--artifacts",
                               str(disk / "art")), "--trials", "3")
    q = shlex.quote(str(disk))
    code, lines = autometa(
        argv, tmp_path,
        before=f"mount -t tmpfs -o size=1m tmpfs {q}; mkdir {q}/art; "
               f"dd if=/dev/zero of={q}/filler bs=4k 2>/dev/null || true",
        after=f"find {q}/art -type f > {shlex.quote(str(tmp_path / 'left'))}")

    one_error_line(code, lines, "no space left")
    assert (tmp_path / "left").read_text().split() == []  # nothing half-written
    rows = trials(tmp_path / "s.db", "full")
    assert [state for _, state, _ in rows] == ["FAIL", "WAITING"], rows
    assert "No space left" in (rows[0][2] or ""), rows  # the failed trial says why

    # Space freed (a store on a disk with room): the same command runs the queued trial.
    assert main(with_flag(argv, "--artifacts", str(tmp_path / "art"))) == 0
    done = [n for n, state, _ in trials(tmp_path / "s.db", "full") if state == "COMPLETE"]
    assert len(done) == 3 and 1 in done


@needs_mount
def test_a_new_study_on_a_full_disk_is_one_line_and_leaves_no_file(made, tmp_path):
    """The error was printed twice within its line, and an empty x.db and its lock file
    were left. Now: one line, said once; no file left; a study already there untouched."""
    disk = tmp_path / "disk"
    disk.mkdir()
    q = shlex.quote(str(disk))
    fill = f"dd if=/dev/zero of={q}/filler bs=4k 2>/dev/null || true"
    out = shlex.quote(str(tmp_path / "after.db"))
    for existing in (False, True):
        argv = with_flag(run_argv(tmp_path, study="fresh"), "--storage",
                         f"sqlite:///{disk}/s.db")
        copy = f"cp {shlex.quote(str(made))} {q}/s.db; " if existing else ""
        code, lines = autometa(
            argv, tmp_path,
            before=f"mount -t tmpfs -o size=1m tmpfs {q}; {copy}{fill}",
            after=f"ls -A {q} > {shlex.quote(str(tmp_path / 'left'))}; "
                  + (f"cp {q}/s.db {out}" if existing else ""))

        one_error_line(code, lines, "full")
        assert lines[0].lower().count("disk is full") == 1, lines[0]
        assert lines[0].count(str(disk)) == 1, lines[0]
        left = sorted((tmp_path / "left").read_text().split())
        assert left == (["filler", "s.db"] if existing else ["filler"]), left
        if existing:  # the study already there: the same bytes
            assert sha256(tmp_path / "after.db") == sha256(made)


def test_tables_of_a_newer_optuna_are_refused_before_any_write(made, tmp_path, capsys):
    """A resume read them without Optuna's version check and wrote to them."""
    db = tmp_path / "s.db"
    shutil.copy(made, db)
    with sqlite3.connect(db) as c:  # as a later Optuna would stamp its schema
        c.execute("UPDATE alembic_version SET version_num = 'v9.9.0.a'")
        c.execute("UPDATE version_info SET library_version = '9.9.0'")
    before = sha256(db)
    argv = with_flag(run_argv(tmp_path, study="base"), "--trials", "2")

    code = main(argv)

    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    one_error_line(code, lines, "9.9.0")
    assert "optuna version" in lines[0].lower()
    assert sha256(db) == before


def _db_error(message: str) -> Exception:
    """The error Optuna raises for a database error ``message`` (SQLAlchemy's, wrapped)."""
    try:
        try:
            raise sqlalchemy.exc.OperationalError("UPDATE trials", {}, Exception(message))
        except sqlalchemy.exc.OperationalError as exc:
            raise optuna.exceptions.StorageInternalError("commit failed") from exc
    except optuna.exceptions.StorageInternalError as exc:
        return exc


@pytest.mark.parametrize("message, lasting", [
    ("attempt to write a readonly database", True),
    ("database or disk is full", True),
    ('could not extend file "base/16384/2619": No space left on device', True),
    ("cannot execute UPDATE in a read-only transaction", True),
    ("permission denied for table trials", True),
    ("The table 'trials' is full", True),
    ('connection to server at "localhost" (127.0.0.1), port 5432 failed: Connection refused',
     False),
    ("server closed the connection unexpectedly", False),
    ("could not receive data from server: Connection reset by peer", False),
    ("database is locked", False),
])
def test_lasting_faults_are_told_from_outages(message, lasting):
    error = _db_error(message)
    assert (lasting_fault(error) is not None) is lasting
    assert is_storage_error(error) is not lasting  # an outage is waited for; a fault is not


def test_waiting_for_a_storage_that_fails_every_write_is_bounded_and_quiet(tmp_path, caplog):
    """A storage that answers reads but fails writes as if unreachable (the issue's
    read-only file before the fix): consecutive waits share one bound and log two lines,
    not a line pair per retry."""
    study = optuna.create_study(storage=f"sqlite:///{tmp_path}/o.db", study_name="o")
    outage = Outage(study, "sqlite:///o.db", timeout=2.0)
    error = _db_error("server closed the connection unexpectedly")
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="autometa.engine.outage"):
        with pytest.raises(StorageUnavailable, match="unreachable for 2 s"):
            while True:  # the worker's loop: the storage answers, the next write fails
                outage.wait(error)
                time.sleep(0.05)
    assert time.monotonic() - start >= 2.0
    assert len(caplog.records) == 2  # "unreachable", "reachable again": once each
    outage.ended()  # a write went through: the next outage has its own bound
    outage.wait(error)


def test_a_lock_file_removed_by_a_failed_creation_is_never_held_twice(tmp_path):
    """A creation that fails removes the lock file it made while still holding it; a
    process that waited on that file must then lock the file at the path, not the removed
    one (else a third process could hold the lock at the same time)."""
    url = f"sqlite:///{tmp_path}/x.db"
    lock = tmp_path / "x.db.autometa-lock"
    entered, holding, release = threading.Event(), threading.Event(), threading.Event()

    def waiter() -> None:
        entered.wait()
        with storage_lock(url):
            holding.set()
            release.wait(60)

    thread = threading.Thread(target=waiter)
    thread.start()
    with pytest.raises(RuntimeError), storage_lock(url, tidy=True):
        entered.set()
        time.sleep(0.5)  # the waiter blocks on this lock file meanwhile
        raise RuntimeError("the creation failed")
    assert holding.wait(60)
    try:
        assert lock.exists()  # the waiter made and holds a new one at the path
        with open(lock) as handle, pytest.raises(BlockingIOError):
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        release.set()
        thread.join(60)
