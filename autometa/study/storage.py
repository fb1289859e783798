"""Opening an Optuna storage: a database URL or a journal file, read-only where asked, and
whether it holds a study yet; the faults of a storage that waiting does not fix (read-only,
full, forbidden, another Optuna's tables), told from an outage, which passes."""

from __future__ import annotations

import errno
import warnings
from pathlib import Path

import optuna

from autometa.errors import ConfigError, one_line, redact
from autometa.study.proxy import open_proxy
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
    ``grpc://host:port`` is an ``autometa storage-proxy`` (:mod:`autometa.study.proxy`):
    heartbeats and the lock go through it, tables are the proxy's to create.

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
    if kind == "grpc":
        proxy = open_proxy(url)
        proxy.stale_callback = retry_callback()
        return proxy
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
        fault = lasting_fault(exc)  # a read-only or full disk, tables of another Optuna
        if fault is not None:
            raise ConfigError(fault_message(f"storage {url}", fault)) from None
        raise open_error(url, exc) from None


#: SQLite's own transient files beside a database file.
SQLITE_SIDE_FILES = ("-journal", "-wal", "-shm")


def remove_new_file(file: Path) -> None:
    """Remove a storage ``file`` that a failed creation left (an empty or half-made SQLite
    database, a journal file) with SQLite's side files; only for a file the caller
    created and that nobody else has used (it held the storage's lock throughout)."""
    for path in (file, *(file.with_name(file.name + side) for side in SQLITE_SIDE_FILES)):
        try:
            path.unlink(missing_ok=True)
        except OSError:  # a read-only folder: nothing was made there either
            pass


#: ``errno`` values of a lasting fault, with the fix each asks for.
_LASTING_ERRNO = {errno.ENOSPC: "free space on its disk", errno.EDQUOT: "free space on its disk",
                  errno.EFBIG: "free space on its disk (or raise the file-size limit)",
                  errno.EROFS: "make it writable", errno.EACCES: "make it writable",
                  errno.EPERM: "make it writable"}
#: Words of a database's own message for a lasting fault (SQLite, PostgreSQL, MySQL), with
#: the fix each asks for. SQLite reports a full disk as "database or disk is full" and a file
#: it may not write as "attempt to write a readonly database".
_LASTING_WORDS = (
    ("readonly database", "make it writable"),
    ("read-only", "make it writable"),  # PostgreSQL's read-only transaction, MySQL's option
    ("disk is full", "free space on its disk"),
    ("no space left", "free space on its disk"),
    ("could not extend file", "free space on its disk"),
    ("is full", "free space on its disk"),  # MySQL: "The table 'x' is full"
    ("disk i/o error", "check its disk"),
    ("permission denied", "give this user write access"),
    ("command denied", "give this user write access"),
    ("unable to open database file", "make its folder writable"),
    ("file is not a database", "restore it from a copy"),
)
#: Optuna's RuntimeError for tables another Optuna version set up, and its fix.
_SCHEMA = ("no longer compatible with the table schema",
           "install the Optuna version that set it up (or, for an older one, upgrade it with "
           "`optuna storage upgrade --storage URL`)")


def lasting_fault(exc: BaseException) -> tuple[str, str] | None:
    """``(reason, fix)`` if ``exc`` (or what caused it) is a fault that waiting does not
    fix, else None: an ``OSError`` of a full, read-only or forbidden disk or file, a
    database's error saying the same (read-only, full, permission denied), or Optuna's
    refusal of tables another Optuna version set up. ``reason`` is one line, passwords
    hidden. A dropped or refused connection is not one (an outage: it is waited for).
    """
    import sqlalchemy.exc

    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in _LASTING_ERRNO:
            return one_reason(seen), _LASTING_ERRNO[seen.errno]
        if isinstance(seen, sqlalchemy.exc.DBAPIError):
            text = str(seen.orig or seen).lower()
            for words, fix in _LASTING_WORDS:
                if words in text:
                    return one_reason(seen), fix
        if isinstance(seen, RuntimeError) and _SCHEMA[0] in str(seen):
            return one_reason(seen), _SCHEMA[1]
        seen = seen.__cause__ or seen.__context__
    return None


def one_reason(exc: BaseException) -> str:
    """What ``exc`` says (a database error's own message), on one line of at most 200
    characters, passwords hidden."""
    text = redact(one_line(str(getattr(exc, "orig", None) or exc)))
    text = text.split(" Please ")[0].rstrip(".")  # Optuna's advice: the fix is given after
    return text if len(text) <= 200 else text[:197] + "..."


def fault_message(where: str, fault: tuple[str, str]) -> str:
    """The one line for a :func:`lasting_fault` met writing to ``where`` (``"storage URL"``,
    ``"artifact store 'dir'"``): what it says, its fix, and that the same command resumes."""
    reason, fix = fault
    return f"{redact(where)}: {reason}; {fix}, then run the same command again to resume"


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
