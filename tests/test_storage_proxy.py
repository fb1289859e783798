"""Workers through ``autometa storage-proxy`` (Optuna's gRPC storage proxy): a real proxy
process in front of a real PostgreSQL server (the ``postgres`` fixture) or a SQLite file,
real ``autometa worker`` processes joined by ``grpc://127.0.0.1:PORT``."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import optuna
import pytest
from limits import POOL_SEARCH, QUICK_SUBPROCESS, STOPPED_PROCESS
from optuna.trial import TrialState

import autometa
from autometa.cli import main
from autometa.engine.lock import storage_lock
from autometa.study.settings import CONFIG_ATTR
from autometa.study.storage import open_storage

grpc = pytest.importorskip("grpc", reason="grpcio (the grpc extra) is not installed")

#: Every test here starts a proxy process (and some, workers): slow.
pytestmark = pytest.mark.slow

SMALL = {"val_episodes": 4, "test_episodes": 4, "eval_queries": 5}
TINY = dict(task_params=SMALL, algorithms=["finetune", "maml"], sources=["mlp"],
            meta_steps=2, eval_every=2, seed=0, pruner="none", baselines=False, top_k=1)


def _cli(*args: str, cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "autometa", *args], cwd=cwd,
                            env={**os.environ, "COLUMNS": "200"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


@contextmanager
def _proxy(url: str, cwd: Path) -> Iterator[str]:
    """``autometa storage-proxy URL --port 0`` running; its ``grpc://`` address. On exit it
    is stopped with SIGTERM, as a scheduler stops it, and must end cleanly."""
    proc = _cli("storage-proxy", url, "--port", "0", cwd=cwd)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], QUICK_SUBPROCESS)
        assert ready, "the proxy printed nothing: a hang"
        first = proc.stdout.readline()  # type: ignore[union-attr]
        assert first.startswith("serving "), (first, proc.communicate(timeout=STOPPED_PROCESS))
        assert "s3cretPW" not in first
        address = first.split(" on ", 1)[1].split()[0]
        assert address.startswith("grpc://127.0.0.1:")
        yield address
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=STOPPED_PROCESS)
    assert proc.returncode == 0, (out, err)
    assert err.strip().splitlines()[-1] == "storage-proxy: stopped by SIGTERM"


def _finish(proc: subprocess.Popen[str]) -> str:
    out, err = proc.communicate(timeout=POOL_SEARCH)
    assert proc.returncode == 0, (out, err)
    return out


def test_two_workers_through_a_proxy_of_postgresql_finish_exactly_the_budget(pg_url, tmp_path):
    # As users write it, with a password (the test server trusts loopback: it is ignored).
    url = pg_url.replace("postgresql+psycopg://postgres@", "postgresql://postgres:s3cretPW@")
    art = tmp_path / "art"
    with _proxy(url, tmp_path) as address:
        # The study made through the proxy, then left to the workers (a tiny timeout: the
        # search starts nothing; each worker brings its own).
        autometa.search("sinusoid", n_trials=5, timeout=1e-3, storage=address,
                        study_name="shared", artifacts=str(art), **TINY)
        workers = [_cli("worker", "shared", "--storage", address, "--artifacts", str(art),
                        "--timeout", "3600", "--threads", "1", "--no-progress", cwd=tmp_path)
                   for _ in range(2)]
        for worker in workers:
            _finish(worker)
        board = _finish(_cli("leaderboard", "shared", "--storage", address, "--out",
                             str(tmp_path / "reports"), cwd=tmp_path))
        trials = optuna.load_study(study_name="shared", storage=open_storage(address)).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 5
    pids = {t.user_attrs["worker"]["pid"] for t in trials}
    assert pids == {w.pid for w in workers}  # both took trials through the proxy
    assert len({str(sorted(t.params.items())) for t in trials}) == 5
    assert "shared: best of each algorithm" in board and "finetune" in board
    # Heartbeats went through the proxy into the database's own table.
    import sqlalchemy

    engine = sqlalchemy.create_engine(pg_url)
    with engine.connect() as connection:
        beats = connection.execute(sqlalchemy.text(
            "SELECT count(*) FROM trial_heartbeats")).scalar()
    engine.dispose()
    assert beats == 5


def test_a_database_restart_behind_the_proxy_is_an_outage_workers_wait_for(postgres, pg_url,
                                                                            tmp_path):
    import threading

    from autometa.engine.outage import is_storage_error

    with _proxy(pg_url, tmp_path) as address:
        storage = open_storage(address)
        optuna.create_study(storage=storage, study_name="s")
        seen: list[Exception] = []
        done = threading.Event()

        def use() -> None:
            while not done.is_set():
                try:  # the lock and a storage call, as a claim makes them
                    with storage_lock(address):
                        storage.get_all_studies()
                except Exception as exc:
                    seen.append(exc)
                time.sleep(0.05)

        user = threading.Thread(target=use)
        user.start()
        try:  # in this thread: the server's process dies with the thread that started it
            postgres.restart(downtime=3.0)
        finally:
            done.set()
            user.join()
        assert seen and all(is_storage_error(exc) for exc in seen), seen[:3]
        with storage_lock(address):  # the proxy reconnects by itself
            assert [s.study_name for s in storage.get_all_studies()] == ["s"]


def test_the_lock_through_a_proxy_is_the_databases_and_is_freed_when_its_holder_dies(
        tmp_path):
    url = f"sqlite:///{tmp_path / 's.db'}"
    with _proxy(url, tmp_path) as address:
        holder = subprocess.Popen(
            [sys.executable, "-c", "import sys, time\nfrom autometa.engine.lock import "
             "storage_lock\nwith storage_lock(sys.argv[1]):\n print('held', flush=True)\n "
             "time.sleep(600)", address], stdout=subprocess.PIPE, text=True)
        try:
            assert holder.stdout.readline() == "held\n"  # type: ignore[union-attr]
            # Taken on the database for the holder: the file lock beside SQLite is busy.
            import fcntl

            with open(f"{tmp_path / 's.db'}.autometa-lock", "a") as handle:
                with pytest.raises(BlockingIOError):
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            holder.kill()  # SIGKILL: nothing released by the holder itself
            holder.wait(timeout=STOPPED_PROCESS)
            began = time.monotonic()
            with storage_lock(address):
                pass
            assert time.monotonic() - began < QUICK_SUBPROCESS
        finally:
            holder.kill()
            holder.wait(timeout=STOPPED_PROCESS)


def test_a_search_through_a_proxy_of_sqlite_and_what_is_refused(tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 's.db'}"
    with _proxy(url, tmp_path) as address:
        board = autometa.search("sinusoid", n_trials=1, storage=address, study_name="one",
                                artifacts=str(tmp_path / "art"),
                                **{**TINY, "algorithms": ["finetune"]})
        assert board.frame["test_mse"].notna().all()  # scored through the proxy
        study = optuna.load_study(study_name="one", storage=url)  # the file behind it
        assert [t.state for t in study.trials] == [TrialState.COMPLETE]
        assert study.user_attrs[CONFIG_ATTR]["config"]["storage"] == address
        # A second proxy on the same port is refused, not silently sharing it.
        assert main(["storage-proxy", url, "--port", address.rsplit(":", 1)[1]]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("autometa: error: storage-proxy: cannot listen on 127.0.0.1:")
    for args, words in (
            (["storage-proxy", str(tmp_path / "j.log")], "cannot be proxied; give a database"),
            (["leaderboard", "one", "--storage", "grpc://127.0.0.1"],
             "is not a proxy address; write grpc://HOST:PORT"),
            (["leaderboard", "one", "--storage", "grpc://127.0.0.1:1"],
             "no storage proxy answers at grpc://127.0.0.1:1")):
        assert main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0], err


def test_a_plain_optuna_proxy_is_refused_as_it_has_no_budget_lock(tmp_path, capsys):
    from optuna.storages._grpc.server import make_server

    port = _free_port()
    # Optuna's own proxy (what run_grpc_proxy_server serves), started in this process.
    server = make_server(optuna.storages.get_storage(f"sqlite:///{tmp_path / 's.db'}"),
                         "127.0.0.1", port)
    server.start()
    try:
        assert main(["leaderboard", "x", "--storage", f"grpc://127.0.0.1:{port}"]) == 2
    finally:
        server.stop(0)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not an autometa storage proxy (it has no budget lock" in err[0]


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_without_grpcio_the_proxy_and_grpc_urls_name_the_extra(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "grpc", None)  # `import grpc` fails, as uninstalled
    for args in (["storage-proxy", f"sqlite:///{tmp_path / 's.db'}"],
                 ["leaderboard", "x", "--storage", "grpc://127.0.0.1:5"]):
        assert main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == ["autometa: error: the gRPC storage proxy needs grpcio; install it with "
                       "pip install 'autometa-ml[grpc]'"]
    assert not (tmp_path / "s.db").exists()
