"""The real PostgreSQL server the tests start themselves (tests/pg_server.py)."""

from __future__ import annotations

import optuna
from pg_server import PostgresServer


def test_optuna_study_on_postgres(postgres: PostgresServer, pg_url: str) -> None:
    """The server accepts connections, and an Optuna RDB study on it records a told trial."""
    with postgres.connect() as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    storage = optuna.storages.RDBStorage(pg_url)
    try:
        study = optuna.create_study(study_name="s", storage=storage)
        trial = study.ask()
        trial.suggest_float("x", 0.0, 1.0)
        study.tell(trial, 0.5)
        loaded = optuna.load_study(study_name="s", storage=storage)
        assert [t.value for t in loaded.trials] == [0.5]
        assert loaded.trials[0].state == optuna.trial.TrialState.COMPLETE
    finally:
        storage.remove_session()
        storage.engine.dispose()


def test_restart_keeps_data(postgres: PostgresServer, pg_url: str) -> None:
    """A study written before a restart loads afterwards, from the same port and data dir."""
    storage = optuna.storages.RDBStorage(pg_url)
    study = optuna.create_study(study_name="kept", storage=storage)
    study.tell(study.ask(), 0.25)
    storage.remove_session()
    # The pool's connections die with the server; a fresh engine avoids reusing them.
    storage.engine.dispose()
    port, data_dir = postgres.port, postgres.data_dir

    postgres.restart()

    assert (postgres.port, postgres.data_dir) == (port, data_dir)
    assert postgres.running
    storage = optuna.storages.RDBStorage(pg_url)
    try:
        loaded = optuna.load_study(study_name="kept", storage=storage)
        assert [t.value for t in loaded.trials] == [0.25]
    finally:
        storage.remove_session()
        storage.engine.dispose()


def test_stop_removes_everything(postgres: PostgresServer) -> None:
    """stop() ends the server process and deletes its directory; a second stop() is harmless."""
    # A server of its own (same binaries as the session's, whose fixture skips or fails when
    # there are none): stopping the shared one would break the other tests.
    server = PostgresServer(postgres.bindir).start()
    base, proc = server.base_dir, server._proc
    assert base is not None and (base / "data" / "PG_VERSION").is_file()
    assert proc is not None and proc.poll() is None

    server.stop()

    assert proc.poll() is not None
    assert not base.exists()
    assert server.base_dir is None and not server.running
    server.stop()
