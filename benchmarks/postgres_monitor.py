"""What postgres_workers.py reads from the server: its statistics and its log.

:class:`Monitor` reads ``pg_stat_database``, ``pg_stat_activity`` and ``trial_heartbeats``'
counters from outside the measured database; :class:`ServerLog` the ERROR lines of the log of
a server the benchmark started itself.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

#: Seconds between two polls of pg_stat_activity (the peak connection count).
POLL_S = 0.05
#: Seconds to wait for the workers' server processes to end, so their statistics are flushed.
SETTLE_S = 20.0


def conninfo(url: str, dbname: str | None = None) -> str:
    """A libpq URI for psycopg from a SQLAlchemy URL, optionally for another database."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url).set(drivername="postgresql")
    if dbname is not None:
        parsed = parsed.set(database=dbname)
    return parsed.render_as_string(hide_password=False)


class Monitor:
    """Reads the server's statistics from outside the measured database.

    Its connections go to the server's ``postgres`` database when it can reach it, so its
    own transactions (a poll every 50 ms) do not land in the numbers it reads.
    """

    def __init__(self, url: str) -> None:
        import psycopg

        self.url = url
        self.dbname = psycopg.conninfo.conninfo_to_dict(conninfo(url))["dbname"]
        try:
            self.info = conninfo(url, "postgres")
            psycopg.connect(self.info, connect_timeout=10).close()
            self.separate = True
        except psycopg.Error:
            self.info = conninfo(url)
            self.separate = False
            print("warning: the server's postgres database is not reachable; the monitor's "
                  "own polls are counted in the transactions", file=sys.stderr)

    def connect(self, target: bool = False) -> Any:
        """An autocommit connection: to the monitor's database, or to the measured one."""
        import psycopg

        return psycopg.connect(conninfo(self.url) if target else self.info, autocommit=True,
                               connect_timeout=10)

    def clients(self, conn: Any) -> int:
        """Client connections to the measured database, this one excepted."""
        return int(conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = %s "
            "AND backend_type = 'client backend' AND pid <> pg_backend_pid()",
            (self.dbname,)).fetchone()[0])

    def database(self, conn: Any) -> dict[str, int]:
        """The measured database's cumulative counters, read afresh."""
        # Each statement in autocommit is its own snapshot; clearing it says so explicitly.
        conn.execute("SELECT pg_stat_clear_snapshot()")
        commit, rollback, deadlocks = conn.execute(
            "SELECT xact_commit, xact_rollback, deadlocks FROM pg_stat_database "
            "WHERE datname = %s", (self.dbname,)).fetchone()
        return {"commit": int(commit), "rollback": int(rollback), "deadlocks": int(deadlocks)}

    def heartbeats(self) -> dict[str, int]:
        """Rows inserted and updated in ``trial_heartbeats`` (a per-database view)."""
        with self.connect(target=True) as conn:
            row = conn.execute("SELECT n_tup_ins, n_tup_upd FROM pg_stat_user_tables "
                               "WHERE relname = 'trial_heartbeats'").fetchone()
        return {"inserted": int(row[0]), "updated": int(row[1])} if row else \
            {"inserted": 0, "updated": 0}

    def settled(self) -> dict[str, int]:
        """The database's counters once no client is connected and they stopped moving.

        A server process sends its statistics when it ends (or, idle, up to seconds later),
        so the counters are read only after the workers' connections are gone.
        """
        deadline = time.monotonic() + SETTLE_S
        with self.connect() as conn:
            while self.clients(conn) and time.monotonic() < deadline:
                time.sleep(0.05)
            last = self.database(conn)
            while time.monotonic() < deadline:
                time.sleep(0.3)
                now = self.database(conn)
                if now == last:
                    break
                last = now
        return last

    @contextmanager
    def peak_connections(self) -> Iterator[list[int]]:
        """Poll the client connections in a thread; the list holds the peak afterwards."""
        peak = [0]
        stop = threading.Event()

        def poll() -> None:
            with self.connect() as conn:
                while not stop.is_set():
                    peak[0] = max(peak[0], self.clients(conn))
                    stop.wait(POLL_S)

        thread = threading.Thread(target=poll, daemon=True, name="pg-poll")
        thread.start()
        try:
            yield peak
        finally:
            stop.set()
            thread.join()


class ServerLog:
    """The ERROR lines the server logged since `mark` (the script's own server only)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.offset = 0

    def mark(self) -> None:
        if self.path is not None and self.path.exists():
            self.offset = self.path.stat().st_size

    def errors(self) -> list[str] | None:
        if self.path is None:
            return None
        with open(self.path, "rb") as log:
            log.seek(self.offset)
            text = log.read().decode(errors="replace")
        return [line.strip() for line in text.splitlines() if "ERROR:" in line]
