"""How torch's CPU threads wait for each other: passively, so that a busy neighbour
process cannot collapse a search.

torch's CPU kernels run on OpenMP (GNU libgomp here; Intel's on other builds), whose idle
threads by default spin for a while at every barrier before they sleep. When another
process holds a core, the thread a barrier waits for is not scheduled, and every small
kernel then waits out a scheduler time slice: on this 2-core machine, sinusoid MAML with 2
threads fell from ~9,100 to ~1,700 tasks/s beside one busy process (issue 26), and to
55-450 tasks/s at a load of 4, against 1,900-5,800 with ``OMP_WAIT_POLICY=PASSIVE`` and
2,500-7,400 with one thread, while conv4 MAML was the same with either policy (3.3-6.5
tasks/s, within the noise). So autometa asks for the passive policy (threads sleep at once
and are woken), unless the user chose a policy.

OpenMP reads ``OMP_WAIT_POLICY`` once, when torch's libraries load: ``import autometa``
sets it in the environment before anything imports torch, which covers the ``autometa``
command, a script that imports autometa first, and every worker process a search starts
(they inherit the environment). A process that imported torch before autometa keeps the
default for its own threads; :func:`wait_policy_note` says so.
"""

from __future__ import annotations

import os
import sys

__all__ = ["WAIT_POLICY", "set_wait_policy", "wait_policy_note"]

#: The OpenMP wait policy autometa asks for (``OMP_WAIT_POLICY``).
WAIT_POLICY = "PASSIVE"

_applied: bool | None = None  # None: not asked yet; whether it reached this process's OpenMP


def set_wait_policy() -> None:
    """Set ``OMP_WAIT_POLICY=PASSIVE`` in the environment, unless the user set a policy;
    it takes effect in this process only if torch is not imported yet (called by
    ``import autometa``), and in every process started from it."""
    global _applied
    if _applied is not None:
        return
    if "OMP_WAIT_POLICY" in os.environ:  # the user's own choice
        _applied = True
        return
    os.environ["OMP_WAIT_POLICY"] = WAIT_POLICY
    _applied = "torch" not in sys.modules


def wait_policy_note(threads: int) -> str | None:
    """Why this process's torch threads may spin-wait (torch was imported before
    autometa, without ``OMP_WAIT_POLICY``), or None when they wait passively or
    ``threads`` is 1 (a single thread never waits at a barrier)."""
    if _applied is False and threads > 1:
        return ("torch was imported before autometa, so its OpenMP threads spin at every "
                "barrier and slow down a lot when another process shares the cores; import "
                "autometa first, set OMP_WAIT_POLICY=PASSIVE before starting Python, or use "
                "threads=1")
    return None
