"""Ray: one ``autometa worker`` per Ray task, placed across the cluster by Ray (``autometa
launch ray``).

Each task asks Ray for ``--gpus-per-worker`` GPUs and ``--cpus-per-worker`` CPUs and runs
the worker command (:meth:`~autometa.launch.WorkerJob.argv`) as a subprocess of its Ray
worker process, on the GPUs Ray gave it (Ray sets ``CUDA_VISIBLE_DEVICES`` for the task;
the subprocess inherits it). The launcher waits for every task and says, for each, the
node, the GPU ids and the exit code.

Where the storage URL travels: in the task's *arguments* (the environment
:meth:`~autometa.launch.WorkerJob.env`), which Ray carries inside its task specification
from this process to the node, and from there into the subprocess's environment
(:data:`~autometa.launch.STORAGE_ENV`). It is never in a command line (``ps``), in a
``runtime_env`` (shown by Ray's dashboard and ``ray list jobs``) or in anything printed.

When a node dies (its raylet and processes gone), Ray runs its task again on a node with
free resources (:data:`MAX_RETRIES` times), and the trial the lost worker was running is
failed and queued again with its parameters by the study itself: at once by a worker on
the same machine (the process is gone), else by any worker's heartbeat after
:data:`~autometa.study.storage.GRACE` seconds of silence
(:mod:`autometa.engine.heartbeat`). The budget stays exact: it is counted in the storage.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from autometa.config import SearchConfig
from autometa.engine.signals import STOP_SIGNALS, deferred, raise_if_stopped
from autometa.errors import ConfigError, one_line, redact
from autometa.launch import STORAGE_ENV, WorkerJob

HELP = "workers as Ray tasks across a Ray cluster (pip install 'autometa-ml[ray]')"
EXTRA = "ray"
#: A task whose node or Ray worker process dies is run again this many times (Ray's
#: ``max_retries``, on any node with the resources); a worker that exits with an error is
#: not (its exit code is reported: running it again would fail the same way).
MAX_RETRIES = 3
#: Seconds to wait, at most, for the launch's :class:`StopFlag` to be up before the tasks
#: are started (they watch it either way).
FLAG_START = 300
#: Seconds to wait for the head at ``--address`` to accept a connection.
CONNECT_TIMEOUT = 10
#: Seconds a stopped worker gets to fail its trial and exit (then it is killed), as SLURM's
#: (``slurm.STOP_GRACE_S``): well above the worker's own wait for its trial process
#: (``engine.pool.STOP_GRACE``), after which it writes the trial's end. On a loaded
#: machine (load ~7 on 2 cores) a stop took ~15 s, and a 15 s grace killed one of two
#: workers before its write (at that load a worker still building its trial once outlasted
#: 60 s too: its trial is then left to the stale-trial check). A literal: importing the
#: pool would import torch for --help.
STOP_GRACE = 60.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Ray's own flags."""
    parser.add_argument("--address", default="auto",
                        help="the Ray cluster to join (ray.init address, HOST:PORT of its "
                             "head; default auto: the cluster this node belongs to)")
    parser.add_argument("--cpus-per-worker", type=_cpus, default=1, metavar="C",
                        help="CPUs each worker task asks Ray for (default 1)")


def _cpus(text: str) -> float:
    """``--cpus-per-worker``: a number of CPUs, 0 or more (checked before the study is
    stored)."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:  # also NaN
        raise argparse.ArgumentTypeError(f"{text!r}: expected a number of CPUs, 0 or more "
                                         "(such as 1 or 0.5)")
    return value


@dataclass(frozen=True)
class Ended:
    """How one worker task ended.

    Attributes:
        node: the Ray node id it ran on (its last try's, after a retry).
        ip: that node's IP address.
        gpus: the GPU ids Ray assigned to it on that node (empty: a CPU worker).
        exit_code: the ``autometa worker`` process's exit status (negative: killed by
            that signal).
    """

    node: str
    ip: str
    gpus: tuple[str, ...]
    exit_code: int


class StopFlag:
    """Set once, by the launcher when it is stopped; every task of the launch watches it
    (a Ray actor on the launcher's node, :func:`launch`). Ray's own cancellation of a
    running task (a KeyboardInterrupt in its process) did not always reach the task: on
    a loaded machine a worker ran on until the launcher left, and Ray then killed it
    without its trial's end written."""

    def __init__(self) -> None:
        import asyncio

        self._stopped = asyncio.Event()

    async def ready(self) -> bool:
        return True

    async def stop(self) -> None:
        self._stopped.set()

    async def wait(self) -> bool:
        await self._stopped.wait()
        return True


def run_worker(argv: Sequence[str], env: Mapping[str, str], cwd: str,
               stop: Any = None) -> Ended:
    """The body of one Ray task, on its node: run ``argv`` with ``env`` added to the
    task's environment (which holds the ``CUDA_VISIBLE_DEVICES`` Ray set for the task),
    in ``cwd`` where that directory exists on this node (a shared disk), and wait for it.

    When the launcher sets ``stop`` (a :class:`StopFlag` actor's handle), or Ray cancels
    the task, the worker is sent SIGTERM: it fails its trial in flight as interrupted and
    queues it again, and is killed if it has not exited after :data:`STOP_GRACE`.

    The subprocess is also sent SIGTERM if this Ray worker process dies (Linux): Ray 2.60
    ends a dead worker's children itself (seen with its raylet killed and with the worker
    killed by ``kill -9``), but an orphan left by a Ray that does not would compute on
    beside the task's retry, on the same GPU.
    """
    import ray

    context = ray.get_runtime_context()
    gpus = tuple(str(gpu) for gpu in ray.get_gpu_ids())
    process = subprocess.Popen(list(argv), env={**os.environ, **env},
                               cwd=cwd if os.path.isdir(cwd) else None,
                               preexec_fn=_die_with_parent())
    watch = None if stop is None else stop.wait.remote()
    try:
        while True:  # in steps: Ray's cancel (a KeyboardInterrupt) comes between two
            if watch is not None and ray.wait([watch], timeout=0)[0]:
                if _stopped(ray, watch):
                    code = _end(process)
                    break
                watch = None  # the flag's actor is gone (its node lost): no stop came
            try:
                code = process.wait(timeout=1)
                break
            except subprocess.TimeoutExpired:
                pass
    except BaseException:  # cancelled: the worker fails its trial as interrupted and
        _end(process)  # queues it again, as on SIGTERM anywhere
        raise
    return Ended(node=context.get_node_id(), ip=ray.util.get_node_ip_address(), gpus=gpus,
                 exit_code=code)


def _stopped(ray: ModuleType, watch: Any) -> bool:
    """Whether the :class:`StopFlag` call ``watch`` (done) says stop; False where its
    actor died instead."""
    try:
        return bool(ray.get(watch))
    except ray.exceptions.RayError:
        return False


def _end(process: subprocess.Popen[bytes]) -> int:
    """SIGTERM ``process``, wait up to :data:`STOP_GRACE` for it (not cut short by a
    KeyboardInterrupt: Ray's cancel may come meanwhile), then kill it; its exit code."""
    process.terminate()
    deadline = time.monotonic() + STOP_GRACE
    while True:
        try:
            return process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            return process.wait()
        except KeyboardInterrupt:
            continue


def _die_with_parent() -> Any:
    """A ``preexec_fn`` that has the child sent SIGTERM when its parent dies (Linux's
    ``PR_SET_PDEATHSIG``); None elsewhere. libc is loaded here, before the fork."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1

    def preexec() -> None:
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)

    return preexec


def describe(workers: int, args: argparse.Namespace) -> str:
    """The tasks ``launch`` starts, in a few words."""
    return (f"{workers} Ray task(s) on the cluster at {args.address}, each asking for "
            f"{args.gpus_per_worker:g} GPU(s) and {args.cpus_per_worker:g} CPU(s) (run again "
            f"up to {MAX_RETRIES} times if its node dies)")


def launch(job: WorkerJob, workers: int, args: argparse.Namespace) -> int:
    """Run ``workers`` Ray tasks each running ``job``; return when they all end.

    Prints the submission and how to watch it, then one line per worker as it ends (its
    node, GPU ids and exit code). ``--dry-run``: prints what would be started (no
    password) and starts nothing, without needing Ray.

    Stopped (Ctrl-C, SIGTERM, SIGHUP), it sets the launch's :class:`StopFlag`, which every
    task watches, and cancels the tasks still queued after: each worker fails its trial
    in flight as interrupted and queues it again (:data:`STOP_GRACE`); then the
    interruption goes on (``autometa`` exits 130, 143, 129) and the same command resumes.

    Returns:
        0 if every worker exited with 0; 1 otherwise (a worker's error, or a task lost more
        than :data:`MAX_RETRIES` times).

    Raises:
        ConfigError: Ray not installed (naming ``pip install 'autometa-ml[ray]'``), or no
            Ray cluster at ``--address``.
    """
    if args.dry_run:
        print(f"dry run: would start {describe(workers, args)}, each running:")
        print(f"  {shlex.join(job.argv())}")
        print(f"  with {STORAGE_ENV} set to the storage URL (carried in the task's arguments, "
              "never in a command line)")
        print("nothing was started")
        return 0
    ray = _import_ray()
    if not ray.is_initialized():  # check() connects first, when autometa launch calls it
        _connect(ray, args.address)
    task = ray.remote(num_gpus=args.gpus_per_worker, num_cpus=args.cpus_per_worker,
                      max_retries=MAX_RETRIES)(run_worker)
    stop = _stop_flag(ray)
    refs = [task.remote(job.argv(), job.env(), os.getcwd(), stop) for _ in range(workers)]
    print(f"started {describe(workers, args)}", flush=True)
    _say_fit(ray, args, workers)
    board = ["autometa", "leaderboard", job.study, "--storage", redact(job.storage)]
    if job.artifacts is not None:
        board += ["--artifacts", job.artifacts]
    print(f"watch: `ray status` (the cluster), `{' '.join(board)}` (the study)", flush=True)
    try:
        return _wait(ray, refs)
    except KeyboardInterrupt:  # Ctrl-C; SIGTERM and SIGHUP too (autometa's Interrupted)
        with deferred():
            print(f"stopping the {workers} worker(s): their trials in flight are failed and "
                  "queued again", flush=True)
            stop.stop.remote()
            # A task ends once its worker has (within its STOP_GRACE): leaving sooner would
            # have Ray kill the workers while they queue their trials again.
            _, left = ray.wait(refs, num_returns=len(refs), timeout=3 * STOP_GRACE)
            for ref in left:  # tasks still queued for a free node, or not answering
                ray.cancel(ref)
        raise_if_stopped()  # SIGTERM's own Interrupted (Ray's wait makes any a KeyboardInterrupt)
        raise


def check(args: argparse.Namespace, config: SearchConfig) -> None:
    """Join the Ray cluster before anything is stored, and check that one of its nodes can
    hold one worker (not for ``--dry-run``, which needs neither Ray nor a cluster).

    Raises:
        ConfigError: Ray not installed (naming ``pip install 'autometa-ml[ray]'``), no Ray
            cluster at ``--address``, or no alive node with ``--gpus-per-worker`` GPUs and
            ``--cpus-per-worker`` CPUs (Ray would queue the tasks for ever); one line
            naming the fix.
    """
    if args.dry_run:
        return
    ray = _import_ray()
    _connect(ray, args.address)
    need = _need(args)
    nodes = _nodes(ray)
    if not any(_fits(have, need) for have in nodes):
        largest = max(nodes, key=lambda have: (have.get("GPU", 0), have.get("CPU", 0)),
                      default={})
        ray.shutdown()
        raise ConfigError(
            f"ray: no node of the cluster at --address {args.address} has "
            f"{need['GPU']:g} GPU(s) and {need['CPU']:g} CPU(s) for one worker (the largest "
            f"has {largest.get('GPU', 0):g} GPU(s) and {largest.get('CPU', 0):g} CPU(s)): "
            "lower --gpus-per-worker / --cpus-per-worker, or add a node with more "
            "(`ray start --address HEAD:6379 --num-gpus N --num-cpus N`)")


def _stop_flag(ray: ModuleType) -> Any:
    """A :class:`StopFlag` actor on this process's node (which lives as long as the
    launcher), taking no CPU, once it is up: its process takes seconds to start (over a
    minute on a loaded machine), which a stop must not wait for."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    actor = ray.remote(num_cpus=0, max_concurrency=100_000, scheduling_strategy=here)(StopFlag)
    flag = actor.remote()
    ray.wait([flag.ready.remote()], timeout=FLAG_START)
    return flag


def _need(args: argparse.Namespace) -> dict[str, float]:
    """What one worker task asks Ray for."""
    return {"GPU": args.gpus_per_worker, "CPU": args.cpus_per_worker}


def _nodes(ray: ModuleType) -> list[dict[str, float]]:
    """The total resources (``{"GPU": 2.0, "CPU": 16.0, ...}``) of each alive node of the
    cluster (``ray.nodes()``)."""
    return [dict(node.get("Resources") or {}) for node in ray.nodes() if node.get("Alive")]


def _fits(have: Mapping[str, float], need: Mapping[str, float]) -> int:
    """How many workers a node with resources ``have`` holds at a time (a large number
    when a worker needs nothing)."""
    return min((int(have.get(k, 0) / v + 1e-9) for k, v in need.items() if v),
               default=sys.maxsize)


def _import_ray() -> ModuleType:
    try:
        import ray
    except ImportError:
        raise ConfigError("autometa launch ray needs Ray: pip install 'autometa-ml[ray]' "
                          "(on this machine and on every node)") from None
    return ray


def _connect(ray: ModuleType, address: str) -> None:
    """``ray.init`` on the cluster at ``address``; no cluster there is one line (Ray itself
    would wait for minutes on a HOST:PORT where nothing listens)."""
    fix = ("start one with `ray start --head` (and `ray start --address HEAD:6379` on the "
           "other nodes), or give --address HOST:PORT of its head")
    if address != "auto" and "://" not in address:
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError(f"--address {address!r}: expected HOST:PORT of the Ray head "
                              "(or auto)")
        try:
            socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT).close()
        except OSError as exc:
            why = exc.strerror or str(exc)
            raise ConfigError(f"ray: nothing answers at --address {address} ({why}): "
                              f"{fix}") from None
    handlers = {stop: signal.getsignal(stop) for stop in STOP_SIGNALS}
    try:
        ray.init(address=address)
    except ConnectionError as exc:
        raise ConfigError(f"ray: no running Ray cluster at --address {address}: {fix} "
                          f"({one_line(str(exc))[:200]})") from None
    for stop, handler in handlers.items():  # ray.init's own would end this process at once
        if callable(handler):
            signal.signal(stop, handler)


def _say_fit(ray: ModuleType, args: argparse.Namespace, workers: int) -> None:
    """Say when the cluster holds fewer than ``workers`` workers at a time (the others'
    tasks queue until one ends, or until a node joins)."""
    need, nodes = _need(args), _nodes(ray)
    at_once = sum(_fits(have, need) for have in nodes)
    if at_once < workers:
        gpus = sum(have.get("GPU", 0) for have in nodes)
        cpus = sum(have.get("CPU", 0) for have in nodes)
        print(f"the cluster has {gpus:g} GPU(s) and {cpus:g} CPU(s) on {len(nodes)} node(s): "
              f"{at_once} worker(s) at a time, the others queue", flush=True)


def _wait(ray: ModuleType, refs: list[Any]) -> int:
    """Wait for every task, printing one line per worker as it ends; 0 if all exited 0."""
    index = {ref: number for number, ref in enumerate(refs, 1)}
    pending, ok = list(refs), True
    while pending:
        # In steps: a stop signal's handler runs between two (not inside Ray's wait).
        done, pending = ray.wait(pending, num_returns=1, timeout=1.0)
        if not done:
            continue
        number = index[done[0]]
        try:
            ended = ray.get(done[0])
        except ray.exceptions.RayError as exc:
            cause = getattr(exc, "cause", None) or exc
            print(f"worker {number}/{len(refs)}: lost: "
                  f"{redact(one_line(str(cause).splitlines()[0] if str(cause) else ''))}"
                  f" ({type(cause).__name__})", flush=True)
            ok = False
            continue
        gpus = ",".join(ended.gpus) or "none"
        print(f"worker {number}/{len(refs)}: node {ended.node[:12]} ({ended.ip}), GPU {gpus}: "
              f"exit {ended.exit_code}", flush=True)
        ok = ok and ended.exit_code == 0
    return 0 if ok else 1
