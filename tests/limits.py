"""Every time limit the tests use, named once: each is a guard against a hang.

A test that waits for something that could block forever (a subprocess, a server, a thread,
a browser, a trial starting) waits at most one of these, so a hang fails that test with a
message instead of stalling the whole run. A limit is never a judgement of speed: no test
asserts how fast anything is. Each value is several times the slowest time seen on a busy
machine (2 cores held at a load of 5-30 by other jobs, where the suite took 49 minutes
instead of 15 and a 21-second CLI run passed 60 s), so a slow machine passes and only a real
hang fails; the price of a generous guard is only paid when something does hang.

``AUTOMETA_TEST_TIME_SCALE`` (a positive number, default 1) multiplies them all, for a
machine slower still (``AUTOMETA_TEST_TIME_SCALE=3 make test``) or to see a suspected hang
fail sooner. Values are whole seconds (Playwright takes milliseconds: ``* 1000`` at the call).

Quiet times below are from this project's 2-core machine with nothing else running.
"""

from __future__ import annotations

import math
import os

#: The environment variable that multiplies every limit.
SCALE_ENV = "AUTOMETA_TEST_TIME_SCALE"


def _scale() -> float:
    text = os.environ.get(SCALE_ENV, "1")
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{SCALE_ENV}={text!r}: expected a positive number such as 1 or 2.5 "
                         f"(it multiplies every time limit in tests/limits.py); unset it for 1")
    return value


#: What every limit is multiplied by (``AUTOMETA_TEST_TIME_SCALE``, default 1).
TIME_SCALE = _scale()


def guard(seconds: float) -> int:
    """``seconds`` times `TIME_SCALE`, rounded up to whole seconds (libpq wants an integer)."""
    return max(1, math.ceil(seconds * TIME_SCALE))


# -- subprocesses ---------------------------------------------------------------------------

#: A short Python subprocess that imports autometa and exits without searching: the checks
#: of what an import loads (``python -c``), ``autometa --help`` and ``autometa plugins``, a
#: leaderboard snapshot, ``unshare``. Quiet 1-10 s (torch's import is most of it).
QUICK_SUBPROCESS = guard(300)

#: One ``autometa`` console-script run that searches a few tiny trials, or is refused while
#: it prepares one: tests/test_bad_input.py's console-script cases, the end-to-end, csv and
#: image-folder CLI tests. Quiet 2-18 s; the bad-input image-folder FIFO and symlink-loop
#: cases took 9-13 s in a full run here, 36-44 s at a load of 8 (tests/busy_neighbour.py),
#: and passed their old 60 s at a load of 5-30: so 15 minutes.
CLI_SEARCH = guard(900)

#: A search with several worker processes, from start to exit: the worker-pool and
#: PostgreSQL tests (each worker starts an interpreter, imports torch and builds the task
#: before its first trial; some runs train hundreds of meta-steps a trial). Quiet 9-44 s a
#: test; one took 123 s in a full run beside another test run.
POOL_SEARCH = guard(1200)

#: Until a background search has a trial running (the tests poll its storage): the
#: workers' start-up comes first. Quiet 3-15 s.
TRIAL_START = guard(600)

#: One step of the plugin-template check (tests/test_plugin_template.py): making a fresh
#: venv, pip-installing autometa and four generated plugins into it (non-editable, the CPU
#: torch from local disk), their tests, a search. The whole test: 100 s quiet, 208 s
#: beside another test run; the install is most of it.
PLUGIN_TEMPLATE_STEP = guard(1800)

#: A result from a forked ``multiprocessing`` pool: one meta-gradient of a tiny conv4
#: (tests/test_inner_loop.py). Quiet about 1 s.
FORKED_CALL = guard(300)

#: A process the test has just killed or interrupted, until it has exited and its pipes are
#: closed: milliseconds after SIGKILL; 1-3 s after a search's Ctrl-C, which stops its
#: workers and marks their trials failed first.
STOPPED_PROCESS = guard(300)

# -- in-process calls -----------------------------------------------------------------------

#: An in-process call run in a thread so that a hang fails instead of blocking
#: (``finishes`` in tests/plugins/): building an image folder of a few dozen tiny images
#: that holds a FIFO or a symlink loop, opening a checkpoint file that is one. Quiet well
#: under 1 s; what it guards against (opening a FIFO) would block forever.
IN_PROCESS_CALL = guard(120)

#: The CPU-bound process beside the second search of tests/test_determinism.py runs until
#: the test kills it; this bounds it should the test's clean-up never run (it also stops
#: once pytest's process is gone). It must outlive that search (quiet about 10 s): the
#: test checks the process was still running when the search ended.
BUSY_LOOP_LIFETIME = guard(1800)

# -- PostgreSQL (tests/pg_server.py) --------------------------------------------------------

#: A PostgreSQL tool run to completion: ``pg_config --bindir``, ``initdb``. Quiet about 1 s
#: (initdb with ``--no-sync``).
PG_COMMAND = guard(300)

#: From launching the server until it accepts connections, per start or restart. Quiet
#: about 1 s.
PG_START = guard(300)

#: One connection attempt (libpq's ``connect_timeout``); the start-up wait retries until
#: `PG_START`. Quiet: milliseconds.
PG_CONNECT = guard(60)

#: Stopping the server: how long each signal is given before the next, harder one. Fast
#: shutdown (SIGINT: disconnect clients, checkpoint), then immediate shutdown (SIGQUIT: no
#: checkpoint, recovery at the next start), then SIGKILL, until the process is reaped.
#: Quiet: under 1 s after SIGINT. A restart after an escalation still works (recovery), so
#: these only need to be long enough for a clean stop on a busy machine.
PG_FAST_SHUTDOWN = guard(120)
PG_IMMEDIATE_SHUTDOWN = guard(60)
PG_KILLED = guard(60)

# -- SLURM (tests/slurm_cluster.py) ---------------------------------------------------------

#: From starting munged, slurmctld and slurmd until the node is idle (and munged's own start).
#: Quiet: about 2 s.
SLURM_START = guard(300)

#: Stopping one SLURM daemon after SIGTERM, before SIGKILL. Quiet: under 1 s.
SLURM_STOP = guard(60)

#: ``autometa launch slurm --wait`` of a tiny study's worker array, from submission until
#: every task ended (torch imported in each task). Quiet: about 30 s.
SLURM_ARRAY = guard(900)

# -- the browser (tests/browser.py) ---------------------------------------------------------

#: Each Playwright step of opening a report: launching the system Chromium, loading the
#: page, waiting for its images, the full-page screenshot. Quiet 1-3 s each.
BROWSER_STEP = guard(180)

# -- container images (tests/test_launch_k8s.py) -------------------------------------------

#: Building docker/Dockerfile's worker image (torch and the pinned set downloaded and
#: installed, layers cached after the first build), or running one command in it.
DOCKER_BUILD = guard(3600)
DOCKER_RUN = guard(300)
