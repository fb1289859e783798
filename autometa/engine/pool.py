"""The pool: worker processes over the devices, supervised by the process that owns the
terminal (as Ray Tune's controller and Syne Tune's local backend do).

Each worker is an OS process started with ``spawn`` (a fresh interpreter: CUDA is first
touched there, on the worker's own device) that claims and runs trials until the budget
is spent (:mod:`~autometa.engine.worker`). The supervisor draws one display from the
workers' events and watches the processes:

* a worker that dies (``kill -9``, out of memory) has its trial failed and queued again
  at once, and a replacement starts on the same device (:data:`MAX_RESTARTS` in a row);
* Ctrl-C stops every worker; their trials are failed and queued, so a resume reruns them;
  SIGTERM and SIGHUP do the same (:mod:`~autometa.engine.signals`), whether they reach
  the supervisor (a worker that ends by one stops the pool) or every process;
* a worker whose supervisor ends, even by ``kill -9``, fails its trial and stops.
"""

from __future__ import annotations

import logging
import multiprocessing
import queue as queues
import signal
from collections.abc import Callable, Sequence
from typing import Any

import optuna

from autometa.engine.claim import fail_running
from autometa.engine.outage import StorageFault
from autometa.engine.signals import Interrupted, deferred, exit_signal, raise_if_stopped
from autometa.engine.worker import Event, WorkerSpec, worker_main
from autometa.errors import ConfigError
from autometa.study.storage import lasting_fault

log = logging.getLogger(__name__)

#: Replacements of one worker slot that died without finishing a trial in between.
MAX_RESTARTS = 3
#: Seconds a stopped worker gets to exit before it is killed.
STOP_GRACE = 5.0


class Pool:
    """Worker processes for ``specs``, one per slot; :meth:`run` returns when all are done."""

    def __init__(self, study: optuna.Study, url: str, specs: Sequence[WorkerSpec],
                 send: Callable[[Event], None]) -> None:
        self.study, self.url, self.specs, self.send = study, url, list(specs), send
        self.context = multiprocessing.get_context("spawn")
        self.events: Any = self.context.Queue()
        # Why the pool is stopped, read by each worker it stops: a worker cannot tell who
        # sent its SIGTERM, and its trial's reason should say Ctrl-C when it was that.
        self.why: Any = self.context.Array("c", 200, lock=False)
        self.processes: dict[int, Any] = {}
        self.running: dict[int, int] = {}  # worker index -> trial number it runs
        self.restarts: dict[int, int] = {spec.index: 0 for spec in self.specs}
        self.errors: dict[int, str] = {}
        self.phases: set[str] = set()  # phase lines shown (each once)
        self.finished = 0  # trials the workers finished
        self.given_up: list[str] = []  # why slots stopped being replaced
        self.fault: str | None = None  # a worker's StorageFault: the pool stops

    def run(self) -> None:
        """Start every worker and supervise until all have ended.

        Raises:
            KeyboardInterrupt: after stopping every worker and queueing their trials again.
        """
        try:
            for spec in self.specs:
                self._start(spec)
            while self.processes:
                raise_if_stopped()  # a SIGTERM whose exception was lost
                self._drain(timeout=0.2)
                if self.fault is not None:  # a disk full or read-only: no worker can go on
                    self.stop("a worker met a storage that takes no write")
                    raise StorageFault(self.fault)
                self._reap()
            if self.given_up and not self.finished:
                raise ConfigError(
                    f"no worker process could run a trial ({self.given_up[0]}); from a Python "
                    "script, call autometa.search or join_search under `if __name__ == "
                    "\"__main__\":` (each worker process imports the main module), or use "
                    "workers=1")
        except KeyboardInterrupt as exc:
            with deferred():
                self.stop(exc.why if isinstance(exc, Interrupted) else "Ctrl-C")
            raise

    def stop(self, why: str) -> None:
        """Stop every worker and fail (and queue again) the trials they were running, as
        ``interrupted (<why>)``."""
        self.why.value = why.encode()[:199]
        for process in self.processes.values():
            process.terminate()
        for process in self.processes.values():
            process.join(STOP_GRACE)
            if process.is_alive():
                process.kill()
                process.join()
        self.processes.clear()
        self._drain(timeout=0)
        for number in self.running.values():
            self._fail(number, f"interrupted ({why})")
        self.running.clear()

    def _start(self, spec: WorkerSpec) -> None:
        process = self.context.Process(target=worker_main,
                                       args=(spec, self.events, self.why),
                                       name=f"autometa-worker-{spec.index}", daemon=True)
        process.start()
        self.processes[spec.index] = process

    def _drain(self, timeout: float) -> None:
        """Forward queued events to the display; wait up to ``timeout`` for the first.

        Workers send ``(method, args, worker index)``; the supervisor keeps which trial
        each worker runs, to fail and queue it again if the worker dies.
        """
        block = timeout > 0
        while True:
            try:
                name, args, index = self.events.get(block=block,
                                                    timeout=timeout if block else None)
            except queues.Empty:
                return
            block = False
            if name == "storage_fault":
                self.fault = self.fault or args[0]
                continue
            if name == "worker_failed":
                self.errors[index] = args[0]
                continue
            if name == "claimed":  # known before sampling, so Ctrl-C there fails it too
                self.running[index] = args[0]
                continue
            if name == "phase":  # every idle worker says it: show it once
                if args[0] in self.phases:
                    continue
                self.phases.add(args[0])
            if name == "trial_finished":
                self.running.pop(index, None)
                self.restarts[index] = 0
                self.finished += 1
            self.send((name, args))

    def _reap(self) -> None:
        """Handle workers that have exited: replace one that died, free one that finished."""
        for index, process in list(self.processes.items()):
            if process.is_alive():
                continue
            process.join()
            self._drain(timeout=0)  # its last events
            del self.processes[index]
            spec = next(s for s in self.specs if s.index == index)
            number = self.running.pop(index, None)
            if process.exitcode == 0 or self.fault is not None:  # a fault: run() stops all
                continue
            stopped = exit_signal(process.exitcode)
            if stopped is not None:  # told to stop (a scheduler signals every process)
                if number is not None:
                    self.running[index] = number  # stop() fails it, if the worker did not
                raise Interrupted(stopped, f"{signal.Signals(stopped).name} to worker {index}")
            if index in self.errors:  # the worker could not start (its device, its data)
                message = self.errors.pop(index)
                log.error("worker %d on %s stopped: %s", index, spec.device, message)
                self.given_up.append(message)
                continue
            reason = f"worker {index} on {spec.device} died (exit code {process.exitcode})"
            if number is not None:
                self._fail(number, reason)
                self.send(("trial_finished", (number, "FAIL", None, f"{reason}; queued again",
                                              True)))
            self.restarts[index] += 1
            if self.restarts[index] > MAX_RESTARTS:
                log.error("%s %d times in a row; not replacing it", reason, MAX_RESTARTS + 1)
                self.given_up.append(reason)
                continue
            log.warning("%s; starting a replacement", reason)
            self._start(spec)

    def _fail(self, number: int, reason: str) -> None:
        try:
            fail_running(self.study, self.url, number, reason)
        except Exception as exc:  # a storage that takes no write: the next run's dead-trial
            if lasting_fault(exc) is None:  # recovery finds it (its process is gone)
                raise
