"""One lock per storage, shared by every process that uses it: creating a study and claiming
a trial against the budget happen under it, so that any number of workers on any number
of machines finish exactly ``n_trials``.

- a SQLite or journal file: ``flock`` on ``<file>.autometa-lock`` beside it (processes of
  this machine; Optuna's journal keeps its own ``<file>.lock`` for its writes);
- PostgreSQL: a session-level advisory lock (``pg_advisory_lock``), held on a connection of
  its own, so every machine's workers queue on the server; the server releases it if the
  holder's connection dies, so a killed worker never leaves it taken;
- MySQL: ``GET_LOCK`` (the same, by name);
- ``grpc://host:port``, an ``autometa storage-proxy``: the proxy takes the lock of the
  database behind it (one of the above) for the caller, and holds it while the caller's
  call stays open (:mod:`autometa.study.proxy`); it too is freed if the caller dies;
- anything else (in-memory storages): none is needed, one process uses it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from autometa.errors import ConfigError
from autometa.study.proxy import hold_lock
from autometa.study.urls import (
    check_folder,
    is_proxy,
    local_file,
    open_error,
    scheme,
    with_driver,
)

#: The advisory lock's key on a PostgreSQL server (any 64-bit number; "auto" in ASCII),
#: and the lock's name on MySQL.
PG_LOCK_KEY = 0x6175746F
MYSQL_LOCK_NAME = "autometa.budget"

_engines: dict[str, Any] = {}


@contextmanager
def storage_lock(url: str, *, tidy: bool = False) -> Iterator[None]:
    """Hold the lock of the storage at ``url`` (see the module's docstring).

    Args:
        tidy: if the body raises, remove a lock file that this call created (a study
            whose creation failed leaves no file behind).

    Raises:
        sqlalchemy.exc.OperationalError: a database server that cannot be reached.
        OSError: a lock file that cannot be created (a read-only or full folder).
    """
    file = local_file(url)
    if file is not None:
        with _file_lock(file, url, tidy):
            yield
    elif scheme(url) in ("postgresql", "mysql"):
        with _server_lock(url):
            yield
    elif is_proxy(url):
        with hold_lock(url):
            yield
    else:
        yield


@contextmanager
def _file_lock(file: Any, url: str, tidy: bool = False) -> Iterator[None]:
    import fcntl

    check_folder(file, url)
    path = f"{file}.autometa-lock"
    while True:
        try:
            handle = os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL), "a")
            created = True
        except FileExistsError:
            created = False
            try:
                handle = open(path, "a")
            except OSError:
                # A lock file this user may not write (a read-only folder or file): flock
                # needs only an open file, and the storage's first write says what is wrong.
                handle = open(path)
        with handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                # A lock file removed (tidy) while this process waited for it: lock the one
                # at the path now, so that no two processes hold different files.
                if os.fstat(handle.fileno()).st_ino != os.stat(path).st_ino:
                    continue
            except FileNotFoundError:
                continue
            try:
                yield
            except BaseException:
                if tidy and created:  # still held: a waiter finds it gone and retries
                    with contextlib.suppress(OSError):
                        os.unlink(path)
                raise
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
            return


@contextmanager
def _server_lock(url: str) -> Iterator[None]:
    import sqlalchemy

    engine = _engines.get(url)
    if engine is None:
        try:  # Pre-ping: a connection the server dropped (a restart) is replaced, not used.
            engine = sqlalchemy.create_engine(with_driver(url), pool_size=1,
                                              pool_pre_ping=True)
        except ConfigError:
            raise
        except Exception as exc:  # a malformed URL, a driver not installed
            raise open_error(url, exc) from None
        _engines[url] = engine
    postgres = scheme(url) == "postgresql"
    take, give = ((f"SELECT pg_advisory_lock({PG_LOCK_KEY})",
                   f"SELECT pg_advisory_unlock({PG_LOCK_KEY})") if postgres else
                  (f"SELECT GET_LOCK('{MYSQL_LOCK_NAME}', -1)",
                   f"SELECT RELEASE_LOCK('{MYSQL_LOCK_NAME}')"))
    # Autocommit: the lock belongs to the session, and no transaction idles while held.
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.execute(sqlalchemy.text(take))
        try:
            yield
        finally:
            try:
                connection.execute(sqlalchemy.text(give))
            except sqlalchemy.exc.DBAPIError:
                # The connection is gone (server restart): so is the lock it held. Drop it
                # from the pool rather than hand a broken connection to the next caller.
                connection.invalidate()
