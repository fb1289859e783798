"""The worker process of proxy_workers.py: many simulated workers, one thread each.

Each thread is one autometa worker with the model taken out (postgres_worker_loop.py's loop:
``claim()`` under the storage lock, ``Heartbeat``, three suggests, one report, ``tell``) and
with what a worker process of its own would hold: directly, an RDB storage and a lock
engine of its own (its own database connections: each thread gets its own URL, the same
database with its own ``application_name``); through the proxy, a ``GrpcStorageProxy``
client (its own channel and trial cache). Threads share the process's cores and GIL, as
128 processes would share the machine's two cores.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from postgres_worker_loop import dummy_trial


def worker_url(url: str, index: int) -> str:
    """The URL simulated worker ``index`` uses: its own connections to the same database."""
    if url.startswith("grpc://"):
        return url
    return f"{url}{'&' if '?' in url else '?'}application_name=bench_w{index}"


def open_for(url: str) -> Any:
    """The storage one simulated worker opens: its own client (see the module docstring)."""
    from autometa.study.proxy import ProxyStorage, open_proxy
    from autometa.study.storage import open_storage, retry_callback

    if not url.startswith("grpc://"):
        return open_storage(url)
    open_proxy(url)  # checks the proxy once per process; the lock uses this one's channel
    storage = ProxyStorage(url)
    storage.info()
    storage.stale_callback = retry_callback()
    return storage


def process_main(url: str, study_name: str, n_trials: int, indices: list[int], ready: Any,
                 start: Any, results: Any) -> None:
    """One process running one thread per simulated worker in ``indices``."""
    import warnings

    warnings.filterwarnings("ignore")
    import optuna

    from autometa.engine import claim as claim_module
    from autometa.engine.claim import claim
    from autometa.engine.heartbeat import Heartbeat
    from autometa.engine.sampling import trial_sampler

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    lock_wait: list[float] = []
    lock_held: list[float] = []
    last = threading.local()  # this thread's latest (wait, held)
    real_lock = claim_module.storage_lock

    @contextmanager
    def timed_lock(lock_url: str) -> Iterator[None]:
        asked = time.perf_counter()
        with real_lock(lock_url):
            got = time.perf_counter()
            try:
                yield
            finally:
                last.timing = (got - asked, time.perf_counter() - got)

    claim_module.storage_lock = timed_lock  # type: ignore[assignment]
    go = threading.Event()

    def one(index: int, report: dict[str, Any], opened: threading.Barrier) -> None:
        mine = worker_url(url, index)
        try:
            study = optuna.load_study(study_name=study_name, storage=open_for(mine))
            study.get_trials(deepcopy=False)
            with real_lock(mine):  # the lock's own connection, as after a first claim
                pass
        except Exception as exc:
            report["error"] = f"start-up: {type(exc).__name__}: {exc}"
        opened.wait()
        go.wait()
        if report["error"]:
            return
        report["first_claim"] = report["last_tell"] = time.time()
        try:
            while True:
                asked = time.perf_counter()
                trial = claim(study, mine, n_trials, None, {"device": "cpu", "worker": index},
                              lambda number: trial_sampler(0, number))
                if trial is None:  # after this worker's last tell: outside the timed window
                    break
                claimed = time.perf_counter()
                report["claim_s"].append(claimed - asked)
                lock_wait.append(last.timing[0])
                lock_held.append(last.timing[1])
                with Heartbeat(study, trial, mine):
                    value = dummy_trial(trial)
                study.tell(trial, value)
                report["last_tell"] = time.time()
                report["trials"] += 1
        except Exception as exc:  # a failed transaction or call reaching the worker
            report["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"

    reports = [{"index": i, "trials": 0, "claim_s": [], "error": None} for i in indices]
    opened = threading.Barrier(len(indices) + 1)
    threads = [threading.Thread(target=one, args=(i, r, opened), daemon=True)
               for i, r in zip(indices, reports, strict=True)]
    for thread in threads:
        thread.start()
    opened.wait()
    ready.put(len(indices))
    start.wait()
    cpu = time.process_time()
    go.set()
    for thread in threads:
        thread.join()
    results.put({"reports": reports, "lock_wait_s": lock_wait, "lock_held_s": lock_held,
                 "cpu_s": time.process_time() - cpu})
