"""Stop signals from schedulers: SIGTERM (SLURM, Kubernetes, systemd) and SIGHUP (a closed
terminal) stop a search as Ctrl-C does.

Python's default for both is to end the process at once: a search's trial in flight would
stay RUNNING until found dead, and a pool's workers would run on without their supervisor.
Within :func:`stop_on_signals` each raises :class:`Interrupted` (a ``KeyboardInterrupt``,
so every ``except Exception`` lets it through, as it does Ctrl-C) in the main thread: the
pool stops its workers, the trials in flight are failed as interrupted and queued again,
and ``autometa`` exits with the shell's code for the signal (128 + its number: 143, 129).
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

#: The signals that stop a search as Ctrl-C does (SIGHUP does not exist on Windows).
STOP_SIGNALS: tuple[signal.Signals, ...] = tuple(
    s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None))
    if s is not None)


class Interrupted(KeyboardInterrupt):
    """The process was told to stop by signal ``signum``; ``why`` says by whom, if known."""

    def __init__(self, signum: int, why: str = "") -> None:
        self.signum = signum
        self.name = signal.Signals(signum).name
        self.why = why or self.name
        super().__init__(self.why)

    @property
    def exit_code(self) -> int:
        """What a shell reports for a process ended by the signal: 128 + its number."""
        return 128 + self.signum

    @property
    def reason(self) -> str:
        """The failure reason stored on a trial it interrupted."""
        return f"interrupted ({self.why})"


def exit_signal(code: int | None) -> int | None:
    """The stop signal a process's exit ``code`` reports (killed by it, ``-signum``, or
    exited after :class:`Interrupted`, ``128 + signum``), else None."""
    for s in STOP_SIGNALS:
        if code in (-s, 128 + s):
            return int(s)
    return None


#: The stop asked by the first signal within :func:`stop_on_signals` (signal, why), if any.
_pending: tuple[int, str] | None = None


def raise_if_stopped() -> None:
    """Raise :class:`Interrupted` again if a stop signal came: called where a search can
    stop cleanly (each meta-step, each claim, the pool's watch), in case the exception the
    signal raised was lost: raised inside a callback of the garbage collector (a weak
    reference's, often during a trial), Python only reports it (``sys.unraisablehook``,
    which :func:`stop_on_signals` keeps quiet about it) and goes on, and a scheduler
    sends its signal once."""
    if _pending is not None:
        raise Interrupted(*_pending)


@contextmanager
def stop_on_signals(why: Callable[[str], str] = lambda name: name) -> Iterator[None]:
    """Within, :data:`STOP_SIGNALS` raise :class:`Interrupted` in this (main) thread, once:
    a second signal during the clean-up it starts is ignored, so that the clean-up
    (failing and queueing the trials in flight) is not cut short; :func:`raise_if_stopped`
    raises it again where the first was lost. The previous handlers are restored on
    leaving. Only the main thread can set handlers: elsewhere, nothing.

    Args:
        why: what the interruption is called, given the signal's name when it comes
            (``"SIGTERM"``, or e.g. ``"SIGTERM: its supervising process ended"``).
    """
    global _pending
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}

    def stop(signum: int, frame: FrameType | None) -> None:
        global _pending
        if _pending is not None:  # the first is being handled (or lost: see raise_if_stopped)
            return
        _pending = (signum, why(signal.Signals(signum).name))
        raise Interrupted(*_pending)

    hook = sys.unraisablehook

    def unraisable(info: Any) -> None:
        if not isinstance(info.exc_value, Interrupted):
            hook(info)
        # else: lost in a callback Python cannot raise from; raise_if_stopped raises it

    for s in STOP_SIGNALS:
        signal.signal(s, stop)
    sys.unraisablehook = unraisable
    try:
        yield
    finally:
        _pending = None
        sys.unraisablehook = hook
        for s, handler in previous.items():
            signal.signal(s, handler)


@contextmanager
def deferred() -> Iterator[None]:
    """Within, :data:`STOP_SIGNALS` are ignored (main thread only; the handlers are restored
    on leaving): a clean-up under way, such as a pool stopping its workers, is not cut
    short by a second signal (a scheduler signals every process: the supervisor's may
    come after a worker's)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
