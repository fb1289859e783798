"""Progress of long work below the engine (a dataset's store being built).

Toolkit code that may run for minutes calls :func:`report` as it goes; whoever shows
progress (the CLI's bars, ``--no-progress`` lines) installs a reporter around the call
with :func:`reporting`. Without one, a log line at the start and at the end.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

__all__ = ["Reporter", "report", "reporting"]

log = logging.getLogger(__name__)

#: ``reporter(what, done, total)``: ``done`` of ``total`` units of ``what`` are finished.
Reporter = Callable[[str, int, int], None]

_reporter: ContextVar[Reporter | None] = ContextVar("autometa_work_reporter", default=None)
_last: ContextVar[float] = ContextVar("autometa_work_last", default=0.0)
#: Seconds between two reports of unfinished work (the first and the last always pass).
INTERVAL = 0.2


@contextmanager
def reporting(reporter: Reporter | None) -> Iterator[None]:
    """Send :func:`report` calls made inside the block to ``reporter`` (None: logging)."""
    token = _reporter.set(reporter)
    try:
        yield
    finally:
        _reporter.reset(token)


def report(what: str, done: int, total: int) -> None:
    """``done`` of ``total`` units of ``what`` (e.g. "decoding 60000 images") are finished.

    Calls with ``done == 0`` or ``done == total`` always reach the reporter; others at
    most every :data:`INTERVAL` seconds, so a loop may call it for every item.
    """
    now = time.monotonic()
    if 0 < done < total and now - _last.get() < INTERVAL:
        return
    _last.set(now)
    reporter = _reporter.get()
    if reporter is not None:
        reporter(what, done, total)
    elif done == 0 or done >= total:
        log.info("%s: %d/%d", what, done, total)
