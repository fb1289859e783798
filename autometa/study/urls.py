"""Storage URLs: what kind of storage a URL names, the file behind it, and its driver."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from autometa.errors import ConfigError, one_line, redact

#: Storage paths that are Optuna journal files (one JSON line per change; local processes).
JOURNAL_SUFFIXES = (".log", ".journal", ".jsonl")

#: PostgreSQL drivers SQLAlchemy knows, in the order a bare ``postgresql://`` URL tries
#: them: psycopg 3 (maintained; ``pip install 'autometa-ml[postgres]'``), then psycopg2.
POSTGRES_DRIVERS = (("psycopg", "psycopg"), ("psycopg2", "psycopg2"))


def scheme(url: str) -> str:
    """The database kind of ``url`` (``sqlite``, ``postgresql``, ...); "" for a file path."""
    return url.split(":", 1)[0].split("+", 1)[0].lower() if "://" in url else ""


def local_file(url: str) -> Path | None:
    """The file behind a SQLite URL or a journal path; None for a server or memory."""
    if "://" not in url:
        return Path(url) if url.endswith(JOURNAL_SUFFIXES) else None
    if scheme(url) == "sqlite" and ":///" in url:
        path = url.split(":///", 1)[1].split("?", 1)[0]
        return Path(path) if path and path != ":memory:" else None
    return None


def is_server(url: str) -> bool:
    """True for a database server that processes on several machines can share."""
    return scheme(url) in {"postgresql", "mysql"}


def is_proxy(url: str) -> bool:
    """True for ``grpc://host:port``: an ``autometa storage-proxy`` in front of a database."""
    return scheme(url) == "grpc"


def with_driver(url: str) -> str:
    """``url`` with an installed driver named: ``postgresql://`` (which SQLAlchemy reads as
    psycopg2) becomes ``postgresql+psycopg://`` when psycopg 3 is the one installed.

    Raises:
        ConfigError: a PostgreSQL URL and no driver installed (the fix: the extra).
    """
    head, _, rest = url.partition("://")
    if is_server(url) and rest.split("/", 1)[0].count("@") > 1:
        raise ConfigError(f"storage: {redact(url)}: the user name or password holds '@'; "
                          "percent-encode it (@ as %40, : as %3A, / as %2F)")
    if head.lower() != "postgresql":
        return url
    for module, dialect in POSTGRES_DRIVERS:
        if importlib.util.find_spec(module) is not None:
            return f"postgresql+{dialect}://{url.split('://', 1)[1]}"
    raise ConfigError(f"storage: {redact(url)} needs a PostgreSQL driver; install it with "
                      "pip install 'autometa-ml[postgres]' (psycopg 3)")


def check_folder(file: Path, url: str) -> None:
    """Raise a one-line ConfigError if the folder of a storage file does not exist."""
    if not file.parent.is_dir():
        raise ConfigError(f"storage: folder {str(file.parent)!r} of {redact(url)} does not "
                          "exist; create it or choose another path")


def open_error(url: str, exc: BaseException) -> ConfigError:
    """The one-line error for a storage that cannot be opened (password shown as ``***``)."""
    while exc.__cause__ is not None:  # Optuna's StorageInternalError wraps the real reason
        exc = exc.__cause__
    reason = redact(one_line(str(getattr(exc, "orig", None) or exc)))
    if len(reason) > 200:
        reason = reason[:197] + "..."
    hint = ("that the server is reachable, the database exists and the user may use it"
            if is_server(url) else "that `autometa storage-proxy` runs there" if is_proxy(url)
            else "its folder and permissions (e.g. sqlite:///autometa.db)")
    return ConfigError(f"storage: cannot open {redact(url)}: {reason}; check the URL, {hint}")
