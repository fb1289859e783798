"""SLURM: a job array of ``autometa worker`` tasks through submitit (``autometa launch
slurm``).

One array task per worker: each asks SLURM for ``--gpus-per-worker`` GPUs
(``--gpus-per-node``; SLURM sets its ``CUDA_VISIBLE_DEVICES``), runs submitit's task
process, which runs :class:`Task`, which runs ``autometa worker STUDY --devices cuda`` as a
subprocess until the study's budget is spent.

Stopping and pre-emption. SLURM signals every process of a task. On SIGTERM (``scancel``,
pre-emption, the time limit's end) the worker fails its trial in flight as interrupted and
queues it again (:mod:`autometa.engine.signals`); :class:`Task` forwards the signal too, in
case the worker is not among the processes signalled. Before the time limit, and on a
pre-emption notice, submitit's signal (``--signal=USR2@90``) calls :meth:`Task.checkpoint`:
the worker is stopped as above and the task is requeued (``scontrol requeue``); the new
task simply joins the study again (the budget and the queued trial are in the storage).

Credentials. submitit pickles the task (:class:`Task`: the worker's command line, no
storage URL) into ``--folder``, and writes the sbatch script there. The storage URL reaches
each task in its environment instead: :func:`launch` sets :data:`~autometa.launch.STORAGE_ENV`
for the ``sbatch`` call only, and sbatch's default ``--export=ALL`` copies it into the job's
environment, which SLURM keeps in its controller's state directory (readable by root and
SlurmUser) for the job's life, requeues included. A site whose sbatch exports less
(``SBATCH_EXPORT``) must keep ``AUTOMETA_STORAGE`` in the list: a task without it stops with
that message.
"""

from __future__ import annotations

import argparse
import io
import math
import os
import pickle
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, redirect_stderr
from pathlib import Path
from types import FrameType, ModuleType
from typing import TYPE_CHECKING, Any

from autometa.errors import ConfigError, redact
from autometa.launch import STORAGE_ENV, WorkerJob

if TYPE_CHECKING:
    from autometa.config import SearchConfig

HELP = "a SLURM job array of workers through submitit (pip install 'autometa-ml[slurm]')"
EXTRA = "slurm"

#: A worker task's time limit when ``--time-limit`` is not given, in minutes. Before it
#: ends the task is requeued (up to :data:`REQUEUES` times) and its worker joins again.
DEFAULT_TIME_LIMIT = 60
#: The shortest ``--time-limit``, in minutes: a task is warned :data:`SIGNAL_DELAY_S`
#: before its limit and its worker stops its trial there, so a shorter task would requeue
#: itself again and again without finishing a trial.
MIN_TIME_LIMIT = 5
#: How many times one array task is requeued at its time limit (submitit's
#: ``max_num_timeout``): a requeued task only joins the study again, so many is harmless.
REQUEUES = 100
#: Seconds between submitit's warning signal and the time limit (``--signal=USR2@90``).
SIGNAL_DELAY_S = 90
#: Seconds a warned worker is given to fail its trial and exit before it is killed (less
#: than :data:`SIGNAL_DELAY_S`, so that the task can still requeue itself).
STOP_GRACE_S = 60
#: Seconds ``sbatch --test-only`` may take (the controller's answer) before it is given up.
SBATCH_TIMEOUT_S = 120
#: The signals a task forwards to its worker (SLURM's stop, Ctrl-C through srun, a hang-up).
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
#: A worker ended by one of these was stopped (SLURM's stop, its kill after KillWait): the
#: task leaves no result, so that a requeued task runs again.
STOPPED = frozenset({*FORWARDED, signal.SIGKILL})


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """SLURM's own flags, passed through to sbatch."""
    parser.add_argument("--partition", help="SLURM partition (sbatch --partition; default: "
                                            "the cluster's)")
    parser.add_argument("--time-limit", type=int, default=DEFAULT_TIME_LIMIT,
                        metavar="MINUTES",
                        help="each worker task's time limit in minutes (sbatch --time; "
                             f"default {DEFAULT_TIME_LIMIT}, at least {MIN_TIME_LIMIT}); "
                             "90 s before it ends, the task's trial is queued again and "
                             "the task requeued")
    parser.add_argument("--account", help="SLURM account to charge (sbatch --account)")
    parser.add_argument("--cpus-per-worker", type=int, metavar="N",
                        help="CPUs per worker task (sbatch --cpus-per-task)")
    parser.add_argument("--sbatch", action="append", default=[], metavar="KEY=VALUE",
                        help="any other sbatch option, e.g. --sbatch qos=high --sbatch "
                             "constraint=a100 (repeatable)")
    parser.add_argument("--folder", default="autometa-slurm",
                        help="where submitit writes the job script, task pickles and logs "
                             "(default autometa-slurm; on a disk the nodes share)")
    parser.add_argument("--wait", action="store_true",
                        help="wait until every task has ended; exit 1 if one failed "
                             "(default: submit and return)")


def check(args: argparse.Namespace, config: SearchConfig) -> None:
    """Refuse bad SLURM flags, and a missing submitit or sbatch, before a study is stored.

    Where ``sbatch`` is on PATH (``--dry-run`` included), ``sbatch --test-only`` asks the
    cluster itself (partition, account, GPUs, time limit), submitting nothing; a dry run
    without sbatch skips that (its script says so).

    Raises:
        ConfigError: naming the flag (or the install line) and the fix.
    """
    _submitit()
    _gpus(args.gpus_per_worker)
    if args.time_limit < MIN_TIME_LIMIT:
        raise ConfigError(f"--time-limit {args.time_limit}: under {MIN_TIME_LIMIT} minutes; "
                          f"SLURM warns a task {SIGNAL_DELAY_S} s before its limit and the "
                          "worker stops its trial there, so it would requeue without "
                          f"finishing one; give at least {MIN_TIME_LIMIT} (minutes), or "
                          "more than a trial lasts")
    if args.cpus_per_worker is not None and args.cpus_per_worker < 1:
        raise ConfigError(f"--cpus-per-worker {args.cpus_per_worker}: expected 1 or more")
    _extra_options(args.sbatch)
    export = os.environ.get("SBATCH_EXPORT")
    if export is not None and not {"ALL", STORAGE_ENV} & set(export.split(",")):
        raise ConfigError(f"SBATCH_EXPORT={export} keeps {STORAGE_ENV} (the storage URL) "
                          "from the worker tasks: add it to the list or unset SBATCH_EXPORT")
    if shutil.which("sbatch") is None:
        if args.dry_run:
            return  # the cluster is not asked: the printed script says so
        raise ConfigError("sbatch not found: run `autometa launch slurm` on a SLURM login "
                          "node (or add --dry-run to print the script)")
    # The cluster's own check (partition, account, GPUs, time), submitting nothing.
    from submitit.slurm.slurm import _make_sbatch_string

    script = _make_sbatch_string(command="true", folder=Path(args.folder).resolve(),
                                 map_count=args.workers if (args.workers or 1) > 1 else None,
                                 **_parameters("autometa", args))
    try:
        tried = subprocess.run(["sbatch", "--test-only"], input=script, capture_output=True,
                               text=True, timeout=SBATCH_TIMEOUT_S)
    except subprocess.TimeoutExpired as error:
        raise ConfigError(f"sbatch --test-only had no answer in {SBATCH_TIMEOUT_S} s: is the "
                          "SLURM controller reachable from here?") from error
    if tried.returncode != 0:
        raise ConfigError(f"sbatch refuses the job: {_sbatch_error(tried.stderr)}; check "
                          "--partition, --account, --gpus-per-worker, --time-limit, --sbatch")


def launch(job: WorkerJob, workers: int, args: argparse.Namespace) -> int:
    """Submit a job array of ``workers`` tasks, each running ``job``'s worker.

    ``--dry-run`` prints the sbatch script instead (:func:`check` has had it tested by
    ``sbatch --test-only`` where sbatch is on PATH; the script says whether). Otherwise
    prints the array's job id, its log folder and how to watch and stop it; with
    ``--wait`` waits for every task.

    Returns:
        0, or 1 when ``--wait`` saw a task fail (each named, with its log).

    Raises:
        ConfigError: sbatch refused the job (its message); bad flags (:func:`check`,
            which ``autometa launch`` calls first, says so before a study is stored).
    """
    folder = Path(args.folder).resolve()
    parameters = _parameters(f"autometa-{job.study}", args)
    task = Task(job.argv())
    if args.dry_run:
        from submitit.slurm.slurm import _make_sbatch_string

        command = " ".join([shlex.quote(job.python), "-u -m submitit.core._submit",
                            shlex.quote(str(folder))])
        script = _make_sbatch_string(command=command, folder=folder,
                                     map_count=workers if workers > 1 else None,
                                     **parameters).splitlines()
        what = f"a {workers}-task array" if workers > 1 else "a 1-task job"
        note = [f"# autometa launch slurm --dry-run: {what}, not submitted (submitting also "
                f"writes each task's pickle into {folder})",
                f"# each task runs, with {STORAGE_ENV} from sbatch's environment (never in "
                f"this script): {job.command()}",
                "# the cluster accepted it (sbatch --test-only)" if shutil.which("sbatch")
                else "# the cluster was not asked (no sbatch here): sbatch --test-only "
                     "checks it on a login node"]
        print("\n".join([script[0], *note, *script[1:]]))
        return 0

    submitit = _submitit()
    folder.mkdir(parents=True, exist_ok=True)
    executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=REQUEUES,
                                      python=shlex.quote(job.python))
    executor.update_parameters(**parameters)
    try:
        # submitit prints sbatch's stderr when it fails: the error below says it once.
        with _exported(STORAGE_ENV, job.storage), redirect_stderr(io.StringIO()):
            jobs = executor.submit_array([task] * workers)
    except Exception as error:  # submitit's FailedJobError: sbatch's own message
        raise ConfigError(f"sbatch refused the job: {_sbatch_error(str(error))}") from error
    array = jobs[0].job_id.split("_")[0]
    gpus = _gpus(args.gpus_per_worker)
    what = (f"job array {array}: {workers} worker tasks {array}_[0-{workers - 1}]"
            if workers > 1 else f"job {array}: 1 worker task")  # submitit: 1 = no array
    print(f"submitted SLURM {what}, {gpus} GPU(s) each, time limit {args.time_limit} min"
          + (f", partition {args.partition}" if args.partition else ""))
    print(f"logs: {folder}/{array}_{'<task>_' if workers > 1 else ''}0_log.out and .err")
    print(f"watch: squeue -j {array}")
    print(f"       autometa leaderboard {shlex.quote(job.study)} "
          f"--storage {shlex.quote(redact(job.storage))}")
    print(f"stop:  scancel {array} (the trials in flight are queued again)")
    if not args.wait:
        return 0
    return _wait(jobs, array)


class Task:
    """What one array task runs: ``autometa worker`` as a subprocess, stopped cleanly on
    SLURM's signals, requeued at the time limit (submitit's ``checkpoint`` protocol, as
    ``submitit.helpers.Checkpointable``).

    submitit pickles it into the job folder: it holds the worker's command line only, never
    the storage URL (the worker reads :data:`STORAGE_ENV` from the task's environment).

    Args:
        argv: the worker's command line (:meth:`WorkerJob.argv`).
    """

    def __init__(self, argv: Sequence[str]) -> None:
        self.argv = list(argv)
        self._process: subprocess.Popen[bytes] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"argv": self.argv}  # never the running process

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.argv = list(state["argv"])
        self._process = None

    def __call__(self) -> int:
        """Run the worker until it exits; return 0 when the study's budget is spent.

        Raises:
            RuntimeError: the worker failed (its code; its log is the task's), or the
                task's environment lacks :data:`STORAGE_ENV`.
            SystemExit: the worker was stopped by a signal (SLURM's stop or pre-emption):
                the task ends with the worker's code and leaves no result, so that a
                requeued task runs again.
        """
        if not os.environ.get(STORAGE_ENV):
            raise RuntimeError(f"{STORAGE_ENV} is not in this task's environment: sbatch must "
                               f"export it (its default, --export=ALL; or add {STORAGE_ENV} "
                               "to SBATCH_EXPORT)")
        gpus = os.environ.get("CUDA_VISIBLE_DEVICES")
        print(f"autometa worker on {socket.gethostname()}, GPUs "
              f"{gpus if gpus else 'none'}: {shlex.join(self.argv)}", flush=True)
        self._process = subprocess.Popen(self.argv, preexec_fn=_ignore_warning)
        previous = {s: signal.signal(s, self._forward) for s in FORWARDED}
        try:
            # poll, not wait(): wait() holds a lock that checkpoint()'s poll needs.
            while (code := self._process.poll()) is None:
                time.sleep(0.5)
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        if code == 0:
            return 0
        signum = -code if code < 0 else code - 128  # killed by it, or exited after it
        if signum in STOPPED:
            sys.exit(128 + signum)
        how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
        raise RuntimeError(f"autometa worker {how}: its message is in this task's log")

    def _forward(self, signum: int, frame: FrameType | None) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signum)

    def checkpoint(self) -> Any:
        """submitit's hook before the time limit or on pre-emption: stop the worker (its
        trial fails as interrupted and is queued again), then return this task for
        submitit to requeue."""
        from submitit.helpers import DelayedSubmission

        self.stop()
        return DelayedSubmission(Task(self.argv))

    def stop(self, grace: float = STOP_GRACE_S) -> None:
        """SIGTERM the worker, wait up to ``grace`` seconds for it to exit, then kill it."""
        process = self._process
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        while process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        if process.poll() is None:
            process.kill()
            while process.poll() is None:
                time.sleep(0.1)


def _ignore_warning() -> None:
    """In the worker, before it runs: ignore submitit's warning signal (SLURM sends it to
    every process of the task; by default it would kill the worker outright). The task
    turns it into a SIGTERM (:meth:`Task.checkpoint`)."""
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


def _submitit() -> ModuleType:
    try:
        import submitit
    except ImportError as error:
        raise ConfigError("autometa launch slurm needs submitit: pip install "
                          f"'autometa-ml[{EXTRA}]' ({_one_line(error)})") from error
    return submitit


def _gpus(value: float) -> int:
    if value < 0 or value != math.floor(value):
        raise ConfigError(f"--gpus-per-worker {value:g}: SLURM gives whole GPUs; give 0, 1, "
                          "2, ...")
    return int(value)


def _extra_options(options: Sequence[str]) -> dict[str, str]:
    extra = {}
    for option in options:
        key, sep, value = option.partition("=")
        key = key.strip().lstrip("-")
        if not sep or not key or not value:
            raise ConfigError(f"--sbatch {option!r}: expected KEY=VALUE, e.g. --sbatch "
                              "qos=high")
        extra[key] = value
    return extra


def _parameters(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """submitit's SlurmExecutor parameters (sbatch's, as ``_make_sbatch_string`` names
    them) for one worker task of job ``name``."""
    parameters: dict[str, Any] = {
        "job_name": name, "time": args.time_limit,
        "signal_delay_s": SIGNAL_DELAY_S, "stderr_to_stdout": False,
    }
    gpus = _gpus(args.gpus_per_worker)
    if gpus:
        parameters["gpus_per_node"] = gpus
    if args.partition:
        parameters["partition"] = args.partition
    if args.account:
        parameters["account"] = args.account
    if args.cpus_per_worker:
        parameters["cpus_per_task"] = args.cpus_per_worker
    # Requeueable whatever the site's JobRequeue: a pre-empted or warned task comes back.
    parameters["additional_parameters"] = {"requeue": True, **_extra_options(args.sbatch)}
    return parameters


@contextmanager
def _exported(name: str, value: str) -> Iterator[None]:
    """``os.environ[name] = value`` within (sbatch, run within, copies it into the job)."""
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            del os.environ[name]
        else:
            os.environ[name] = before


def _sbatch_error(stderr: str) -> str:
    """sbatch's error lines as one (``sbatch: error: `` said once)."""
    lines = [line.strip().removeprefix("sbatch: error:").strip()
             for line in stderr.splitlines() if line.strip()]
    return redact("; ".join(lines) or "no message")


def _one_line(error: BaseException) -> str:
    return redact(" ".join(str(error).split()))


def _squeue(array: str) -> set[str] | None:
    """The array's tasks SLURM still holds (pending, running, requeued), or None when
    squeue fails."""
    result = subprocess.run(["squeue", "-h", "-r", "-j", array, "-o", "%i"],
                            capture_output=True, text=True)
    if result.returncode != 0:
        return None
    return {line.strip() for line in result.stdout.splitlines() if line.strip()}


def _wait(jobs: Sequence[Any], array: str, poll_s: float = 2.0) -> int:
    """Wait until every task has left SLURM's queue; print each failure; 1 if any."""
    print(f"waiting for SLURM job {array} (Ctrl-C stops waiting; the tasks go on)",
          flush=True)
    failures = 0
    try:
        errors = 0
        while True:
            pending = [j for j in jobs if not j.paths.result_pickle.exists()]
            if not pending:
                break
            held = _squeue(array)
            errors = errors + 1 if held is None else 0
            if errors >= 30:
                raise ConfigError(f"squeue -j {array} keeps failing: is slurmctld reachable?")
            if held is not None and not held & {j.job_id for j in pending}:
                time.sleep(poll_s)  # a result written as the task left the queue
                break
            time.sleep(poll_s)
    except KeyboardInterrupt:
        print(f"stopped waiting; the tasks go on (scancel {array} stops them)")
        return 130
    for job in jobs:
        if job.paths.result_pickle.exists():
            with job.paths.result_pickle.open("rb") as file:
                outcome, value = pickle.load(file)  # submitit's ("success"|"error", ...)
            if outcome == "success":
                continue
            lines = [line for line in str(value).splitlines() if line.strip()]
            why = redact(lines[-1].strip() if lines else outcome)
        else:
            why = "ended without a result (cancelled, killed or out of time)"
        failures += 1
        print(f"task {job.job_id} failed: {why}; its log: {job.paths.stderr}")
    print(f"SLURM job {array}: {len(jobs) - failures} of {len(jobs)} task(s) ended cleanly")
    if failures:
        print("their trials in flight were queued again: re-run the same `autometa launch "
              "slurm` command to start workers that resume the study")
    return 1 if failures else 0
