"""A storage that went away, told from one that refuses to be written.

An **outage** (a database server restarting, a dropped or refused connection) passes by
waiting: a worker's trial is not failed for the storage's fault, and the worker waits for
it, at most :data:`OUTAGE` seconds. A **lasting fault** does not pass by waiting: a
read-only database or folder, a full disk, a user without write permission, tables of
another Optuna version. It stops the search at the first write that fails, as one line
(:class:`StorageFault`, exit code 2), with the trial in flight failed and queued again.
"""

from __future__ import annotations

import errno
import logging
import sys
import time

import optuna

from autometa.engine.claim import fail_running
from autometa.errors import AutometaError, redact
from autometa.study.artifacts import StoreWriteError
from autometa.study.storage import fault_message, lasting_fault, one_reason

log = logging.getLogger(__name__)


#: Seconds a worker waits for an unreachable storage (a database server restarting)
#: before it gives up.
OUTAGE = 300

def is_storage_error(exc: BaseException) -> bool:
    """True if ``exc`` (or what caused it) says the storage cannot be reached: a dropped or
    refused database connection, or a storage proxy that does not answer (gRPC's
    UNAVAILABLE), as opposed to an error of the trial itself or a :func:`lasting_fault`.
    Optuna wraps SQLAlchemy's errors in ``StorageInternalError``; the cause is checked."""
    import sqlalchemy.exc

    if lasting_fault(exc) is not None:
        return False
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, sqlalchemy.exc.OperationalError | sqlalchemy.exc.InterfaceError):
            return True
        if isinstance(seen, sqlalchemy.exc.DBAPIError) and seen.connection_invalidated:
            return True
        if _proxy_unavailable(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _proxy_unavailable(exc: BaseException) -> bool:
    """True for gRPC's UNAVAILABLE (a storage proxy restarting); grpc is imported only
    where a proxy was used."""
    grpc = sys.modules.get("grpc")
    return grpc is not None and isinstance(exc, grpc.RpcError) \
        and exc.code() == grpc.StatusCode.UNAVAILABLE


class StorageFault(AutometaError):
    """The storage or the artifact store refused a write for a reason waiting cannot fix
    (:func:`lasting_fault`); the search stops."""


def stops_search(exc: BaseException) -> bool:
    """True if ``exc``, raised by a trial, is not the trial's fault but one that stops the
    search: a :func:`lasting_fault` of the storage or the artifact store, or a full or
    read-only disk anywhere. A file the trial's own code may not read stays its failure."""
    if lasting_fault(exc) is None:
        return False
    if isinstance(exc, OSError) and not isinstance(exc, StoreWriteError):
        return exc.errno in _DISK_ERRNO
    return True


#: ``errno`` values that stop a search wherever a trial meets them: the disk, not the file.
_DISK_ERRNO = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


def stop_search(exc: BaseException, url: str, artifacts: str, study: optuna.Study | None = None,
                number: int | None = None) -> None:
    """Raise the one-line :class:`StorageFault` if ``exc`` is a :func:`lasting_fault`
    (else return), after failing trial ``number`` of ``study`` with the reason and queueing
    it again, if the storage at ``url`` still takes that write (else the next run finds it
    dead, by its process or its heartbeat, and queues it). ``artifacts``: the artifact store.
    """
    if isinstance(exc, StorageFault):
        raise exc
    fault = None if isinstance(exc, AutometaError) else lasting_fault(exc)  # said already
    if fault is None:
        return
    where = f"storage {url}"
    if isinstance(exc, StoreWriteError):
        where = f"artifact store {artifacts!r}" if exc.in_store else "temporary folder"
    elif isinstance(exc, OSError) and exc.filename:
        where = f"file {exc.filename!r}"
    elif isinstance(exc, OSError) and "://" in url:  # not a journal file's write
        where = "a disk"
    queued = False
    if study is not None and number is not None:
        try:
            fail_running(study, url, number, f"interrupted: {redact(where)}: {fault[0]}")
            queued = True
        except Exception:  # the storage refuses this write too
            log.debug("could not fail trial %d", number, exc_info=True)
    raise fault_error(where, fault, number, queued) from None


def fault_error(where: str, fault: tuple[str, str], trial: int | None = None,
                queued: bool = True) -> StorageFault:
    """The one-line :class:`StorageFault` for ``fault`` (:func:`lasting_fault`'s reason and
    fix) met writing to ``where`` ("storage sqlite:///x.db", "artifact store 'dir'").

    Args:
        trial: the number of the trial in flight, named in the message.
        queued: whether that trial was failed and queued again (else the next run finds it
            dead and queues it).
    """
    then = "" if trial is None else (
        f"; trial {trial} was stopped and runs again then" if queued
        else f"; trial {trial} runs again then")
    return StorageFault(fault_message(where, fault) + then)


def wait_for_storage(study: optuna.Study, url: str, error: BaseException,
                     timeout: float = OUTAGE, *, quiet: bool = False) -> None:
    """Block until the storage answers again (connections are re-made by the pool's
    pre-ping), polling every few seconds; ``quiet`` logs nothing (a wait that goes on).

    Raises:
        StorageUnavailable: still unreachable after ``timeout`` seconds.
    """
    if not quiet:
        log.warning("storage %s is unreachable (%s); waiting up to %d s for it", redact(url),
                    one_reason(error), timeout)
    deadline = time.monotonic() + timeout
    delay = 0.5
    while True:
        try:
            study._storage.get_study_id_from_name(study.study_name)
        except Exception as exc:
            if not is_storage_error(exc):
                raise
            if time.monotonic() + delay > deadline:
                raise _gave_up(url, exc, timeout) from None
            time.sleep(delay)
            delay = min(delay * 2, 5.0)
            continue
        if not quiet:
            log.warning("storage %s is reachable again", redact(url))
        return


def _gave_up(url: str, exc: BaseException, timeout: float) -> StorageUnavailable:
    return StorageUnavailable(
        f"storage {redact(url)} unreachable for {timeout:.0f} s ({one_reason(exc)}); this worker "
        "stops, and its trial in flight runs again when a worker resumes the study")


class Outage:
    """One worker's waits for its storage, bounded together: a storage that answers reads
    but fails every write in a way :func:`is_storage_error` takes for an outage would
    otherwise be waited for again and again (each wait ending at once). Consecutive waits
    with no successful claim between them (:meth:`ended`) share one :data:`OUTAGE` and
    log one warning, and one line when the storage answers.
    """

    def __init__(self, study: optuna.Study, url: str, timeout: float = OUTAGE) -> None:
        self.study, self.url, self.timeout = study, url, timeout
        self.since: float | None = None

    def wait(self, error: BaseException) -> None:
        """Wait for the storage (see :func:`wait_for_storage`) within what is left.

        Raises:
            StorageUnavailable: this outage has lasted ``timeout`` seconds.
        """
        now = time.monotonic()
        first = self.since is None
        if self.since is None:
            self.since = now
        left = self.since + self.timeout - now
        if left <= 0:
            raise _gave_up(self.url, error, self.timeout)
        wait_for_storage(self.study, self.url, error, left, quiet=not first)

    def ended(self) -> None:
        """A write went through: the next outage is a new one."""
        self.since = None


class StorageUnavailable(AutometaError):
    """The storage stayed unreachable longer than :data:`OUTAGE` seconds."""
