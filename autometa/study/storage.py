"""Opening an Optuna storage: a database URL or a journal file, read-only where asked, and
whether it holds a study yet."""

from __future__ import annotations

import warnings

import optuna

from autometa.errors import ConfigError, redact
from autometa.study.urls import (
    JOURNAL_SUFFIXES,
    check_folder,
    local_file,
    open_error,
    scheme,
    with_driver,
)

#: Seconds between heartbeats of a running trial; a trial silent for GRACE is stale.
HEARTBEAT, GRACE = 10, 30
#: A stale or crashed trial runs again with its parameters, at most this many times.
MAX_RETRY = 2
#: Seconds a SQLite connection waits for another process's write before failing.
SQLITE_BUSY_TIMEOUT = 60


def retry_callback() -> optuna.storages.RetryHeartbeatStaleTrialCallback:
    """Optuna's callback that queues a failed trial again (WAITING) with its parameters."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)


def open_storage(url: str, *, must_exist: bool = False, create_tables: bool = True
                 ) -> optuna.storages.BaseStorage:
    """Open an Optuna storage: a database URL, or the path of a journal file.

    SQLite waits up to :data:`SQLITE_BUSY_TIMEOUT` seconds for other processes' writes;
    RDB storages get heartbeats, so a trial of a process that died is found stale on any
    machine and retried (:data:`GRACE`). A path ending in ``.log``, ``.journal`` or
    ``.jsonl`` is Optuna's journal file storage (local processes, no server).

    Args:
        must_exist: for read-only commands: a file that does not exist is an error instead
            of being created.
        create_tables: False to only read an RDB storage: no table is created and the
            schema's version is not checked (that check may write its version row), so
            nothing is written even to a database another process is creating.

    Raises:
        ConfigError: one line naming the URL with its password replaced by ``***``.
    """
    shown = redact(url)
    kind = scheme(url)
    file = local_file(url)
    if must_exist and file is not None and not file.is_file():
        raise ConfigError(f"storage: no database at {str(file)!r} ({shown}); run a search "
                          "first or give --storage")
    if file is not None:
        check_folder(file, url)
    if kind == "postgres":
        raise ConfigError(f"storage: {shown}: write postgresql://, not postgres:// "
                          "(SQLAlchemy's name for the dialect)")
    if not kind and file is None:
        raise ConfigError(f"storage: {shown} is neither a database URL (sqlite:///x.db, "
                          "postgresql://...) nor a journal file path ending in "
                          f"{', '.join(JOURNAL_SUFFIXES)}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            if not kind:
                from optuna.storages.journal import JournalFileBackend, JournalStorage

                return JournalStorage(JournalFileBackend(str(file)))
            if kind in {"sqlite", "postgresql", "mysql"}:
                # A server's connections are checked before use (pre-ping), so a worker
                # reconnects by itself after the server restarts.
                kwargs = ({"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT}}
                          if kind == "sqlite" else {"pool_pre_ping": True})
                return optuna.storages.RDBStorage(
                    with_driver(url),
                    engine_kwargs=kwargs,
                    heartbeat_interval=HEARTBEAT,
                    grace_period=GRACE,
                    heartbeat_stale_trial_callback=retry_callback(),
                    skip_table_creation=not create_tables,
                    skip_compatibility_check=not create_tables,
                )
            return optuna.storages.get_storage(url)
    except ConfigError:
        raise
    except Exception as exc:
        raise open_error(url, exc) from None


def study_exists(url: str, name: str) -> bool:
    """True if study ``name`` is in the storage at ``url``; creates and writes nothing."""
    file = local_file(url)
    if (file is not None and not file.is_file()) or not schema_ready(url):
        return False
    storage = open_storage(url, create_tables=False)
    return name in optuna.get_all_study_names(storage)


def schema_ready(url: str) -> bool:
    """True once Optuna's tables exist at ``url`` and are stamped with their version.

    Checked with one plain query before a reader opens the storage: Optuna's RDB storage
    writes its version rows when it finds none, even when told to skip creating tables,
    and doing that while another process creates the schema makes that process fail
    ("already exists"). A journal file is always ready once it exists.

    Raises:
        ConfigError: the storage cannot be reached (see :func:`open_storage`).
    """
    if scheme(url) not in {"sqlite", "postgresql", "mysql"}:
        return True
    file = local_file(url)
    if file is not None and not file.is_file():
        return False
    import sqlalchemy

    try:
        engine = sqlalchemy.create_engine(with_driver(url), poolclass=sqlalchemy.pool.NullPool)
    except ConfigError:
        raise
    except Exception as exc:
        raise open_error(url, exc) from None
    try:
        with engine.connect() as connection:
            return connection.execute(
                sqlalchemy.text("SELECT version_num FROM alembic_version")).first() is not None
    except sqlalchemy.exc.ProgrammingError:  # PostgreSQL, MySQL: no such table
        return False
    except sqlalchemy.exc.OperationalError as exc:
        if scheme(url) == "sqlite" and "no such table" in str(exc):
            return False
        raise open_error(url, exc) from None
    except sqlalchemy.exc.DatabaseError as exc:  # e.g. a file that is not a database
        raise open_error(url, exc) from None
    finally:
        engine.dispose()
