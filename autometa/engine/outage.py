"""A database server that went away: telling its errors from a trial's own, and waiting
for it to come back (a worker's trial is not failed for the storage's fault)."""

from __future__ import annotations

import logging
import time

import optuna

from autometa.errors import AutometaError, one_line, redact

log = logging.getLogger(__name__)


#: Seconds a worker waits for an unreachable storage (a database server restarting)
#: before it gives up.
OUTAGE = 300


def is_storage_error(exc: BaseException) -> bool:
    """True if ``exc`` (or what caused it) says the storage cannot be reached: a dropped or
    refused database connection, as opposed to an error of the trial itself. Optuna wraps
    SQLAlchemy's errors in ``StorageInternalError``; the cause is checked."""
    import sqlalchemy.exc

    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, sqlalchemy.exc.OperationalError | sqlalchemy.exc.InterfaceError):
            return True
        if isinstance(seen, sqlalchemy.exc.DBAPIError) and seen.connection_invalidated:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def wait_for_storage(study: optuna.Study, url: str, error: BaseException,
                     timeout: float = OUTAGE) -> None:
    """Block until the storage answers again (connections are re-made by the pool's
    pre-ping), polling every few seconds.

    Raises:
        StorageUnavailable: still unreachable after ``timeout`` seconds.
    """
    log.warning("storage %s is unreachable (%s); waiting up to %d s for it", redact(url),
                redact(one_line(str(getattr(error, "orig", None) or error)))[:200], timeout)
    deadline = time.monotonic() + timeout
    delay = 0.5
    while True:
        try:
            study._storage.get_study_id_from_name(study.study_name)
        except Exception as exc:
            if not is_storage_error(exc):
                raise
            if time.monotonic() + delay > deadline:
                raise StorageUnavailable(
                    f"storage {redact(url)} unreachable for {timeout:.0f} s "
                    f"({redact(one_line(str(exc)))[:200]}); this worker stops, and its trial "
                    "in flight runs again when a worker resumes the study") from None
            time.sleep(delay)
            delay = min(delay * 2, 5.0)
            continue
        log.warning("storage %s is reachable again", redact(url))
        return


class StorageUnavailable(AutometaError):
    """The storage stayed unreachable longer than :data:`OUTAGE` seconds."""
