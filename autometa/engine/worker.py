"""A worker: claims trials against the study's budget, runs each one, reports to the display.

One worker runs one trial at a time on one device. It owns nothing but its device: the
study's settings come from the storage, the budget is counted there
(:func:`~autometa.engine.storage.claim`), and what it does is sent as events to whoever
draws the display (the calling process itself, or the pool's supervisor).

An event is ``(method, args)`` naming a :class:`~autometa.progress.Progress` method:
``trial_started``, ``step``, ``evaluated``, ``trial_finished``; and ``claimed`` (a trial
number, before its parameters are sampled) for a pool's supervisor.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.trial import TrialState

from autometa.config import SearchConfig
from autometa.engine.prepare import Prepared, prepare
from autometa.engine.sampling import pruner, sampler, trial_sampler
from autometa.engine.storage import CONFIG_ATTR, claim, fail_running, open_study
from autometa.errors import one_line, redact
from autometa.plugins import PluginHost, create_host
from autometa.space import suggest
from autometa.trial import Diverged, TrialPlan, build, meta_train, save_state, trial_seed

log = logging.getLogger(__name__)

Event = tuple[str, tuple[Any, ...]]
#: Seconds between two ``step`` events of a trial (the display needs no more).
STEP_EVENT_EVERY = 0.2


@dataclass(frozen=True)
class WorkerSpec:
    """What one worker needs; picklable, so that a pool can send it to a child process."""

    config: dict[str, Any]  # the prepared (typed) SearchConfig, as a dict
    device: str  # this worker's torch device
    index: int = 0  # the worker's number in its pool
    threads: int | None = None  # torch intra-op threads in this worker (None: torch's)
    deadline: float | None = None  # time.time() after which no trial starts


def run_worker(spec: WorkerSpec, send: Callable[[Event], None], *,
               host: PluginHost | None = None, prepared: Prepared | None = None,
               keep_going: Callable[[], bool] = lambda: True) -> int:
    """Run trials until the study's budget or the deadline is spent; returns how many.

    ``prepared`` skips the preparation (the calling process has done it on this device);
    ``keep_going`` is asked before each claim (a pool's worker stops when its supervisor
    is gone).
    """
    if spec.threads:
        torch.set_num_threads(spec.threads)
    if prepared is None:
        config = SearchConfig.from_dict(spec.config, where="stored settings")
        prepared = prepare(replace(config, device=spec.device, devices=[spec.device]),
                           host or create_host())
    config = prepared.config
    study = open_study(prepared, sampler(config.seed), pruner(config.pruner))
    artifacts = Path(study.user_attrs[CONFIG_ATTR]["artifacts_path"])
    ran = 0
    while keep_going():
        trial = claim(study, config.storage, config.n_trials, spec.deadline,
                      {"device": spec.device, "worker": spec.index},
                      lambda number: trial_sampler(config.seed, number))
        if trial is None:
            return ran
        send(("claimed", (trial.number,)))
        try:
            run_trial(study, trial, prepared, artifacts, send, device=spec.device)
        except BaseException:  # Ctrl-C in this process: the trial runs again on resume
            fail_running(study, config.storage, trial.number, "interrupted")
            raise
        ran += 1
    return ran


def run_trial(study: optuna.Study, trial: optuna.Trial, prepared: Prepared, artifacts: Path,
              send: Callable[[Event], None], *, device: str) -> None:
    """Sample ``trial``'s configuration, meta-train it, and tell the study how it ended.

    Any exception inside the trial fails it with its reason (``user_attrs["failure"]``)
    and the worker goes on; a pruned trial keeps its last meta-val score.
    """
    config, task, host = prepared.config, prepared.task, prepared.host
    plan = TrialPlan(
        algorithm=trial.suggest_categorical("algorithm", list(prepared.algorithms)),
        source=trial.suggest_categorical("source", list(prepared.sources)),
    )
    plan = TrialPlan(plan.algorithm, plan.source,
                     suggest(trial, plan.algorithm, prepared.algorithms[plan.algorithm]),
                     suggest(trial, plan.source, prepared.sources[plan.source]))
    for key, value in vars(plan).items():
        trial.set_user_attr(key, value)
    send(("trial_started", (trial.number, plan.describe(), config.meta_steps, device)))
    seed = trial_seed(config.seed, trial.number)
    last = [0.0]

    def on_step(step: int) -> None:
        now = time.monotonic()
        if now - last[0] >= STEP_EVENT_EVERY:
            last[0] = now
            send(("step", (trial.number, step)))

    def on_eval(step: int, score: float) -> None:
        trial.report(score, step)
        send(("evaluated", (trial.number, step, score)))
        if trial.should_prune():
            raise optuna.TrialPruned(f"meta-val {score:.4g} at step {step}")

    state, value, note = TrialState.COMPLETE, None, ""
    with _heartbeat(study, trial):
        try:
            generator = torch.Generator(device=task.device).manual_seed(seed)
            algorithm = build(host, task, plan, seed)
            value = meta_train(algorithm, task, meta_steps=config.meta_steps,
                               eval_every=config.eval_every, generator=generator,
                               on_eval=on_eval, on_step=on_step)
            save_state(algorithm, artifacts / f"trial-{trial.number}.pt")
        except optuna.TrialPruned as exc:
            state, note = TrialState.PRUNED, str(exc)
        except Diverged as exc:
            state, note = TrialState.FAIL, f"diverged: {exc}"
        except Exception as exc:  # this trial's data, hyperparameters or plugin code
            log.debug("trial %d failed", trial.number, exc_info=True)
            state, note = TrialState.FAIL, f"{type(exc).__name__}: {redact(one_line(str(exc)))}"
        finally:
            algorithm = None  # type: ignore[assignment]  # free the device before the next
            _release_device_memory(task.device)
    if state == TrialState.FAIL:
        trial.set_user_attr("failure", note[:1000])
    frozen = study.tell(trial, value if state == TrialState.COMPLETE else None, state=state)
    send(("trial_finished", (trial.number, state.name, value, note)))
    host.notify("trial_finished", study_name=study.study_name, trial=frozen)


def _heartbeat(study: optuna.Study, trial: optuna.Trial) -> Any:
    """Optuna's heartbeat thread for ``trial`` (as ``study.optimize`` runs it), so that a
    trial of a process that dies is found stale on any machine; a no-op without heartbeats."""
    from optuna.storages._heartbeat import get_heartbeat_thread  # Optuna's own, not public

    return get_heartbeat_thread(trial._trial_id, study._storage)


def _release_device_memory(device: torch.device) -> None:
    """Return a CUDA device's blocks after a trial, so the next starts at its baseline
    (reference cycles in a plugin's objects would otherwise hold tensors until a later
    collection)."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


def worker_main(spec: WorkerSpec, queue: Any) -> None:
    """Entry point of a pool's child process: run trials, sending events to ``queue``.

    The child ignores Ctrl-C (the supervisor owns the terminal and stops workers itself)
    and fixes its CUDA device before any CUDA work.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=logging.WARNING, format=f"%(levelname)s worker {spec.index}: "
                                                      "%(name)s: %(message)s")
    import warnings

    warnings.filterwarnings("ignore")  # the supervisor's terminal shows trials, not noise
    device = torch.device(spec.device)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    def send(event: Event) -> None:
        queue.put((*event, spec.index))

    supervisor = os.getppid()
    try:
        run_worker(spec, send, keep_going=lambda: os.getppid() == supervisor)
    except Exception as exc:
        send(("worker_failed", (f"{type(exc).__name__}: {redact(one_line(str(exc)))}",)))
        queue.close()
        queue.join_thread()  # the message is sent before the process ends
        os._exit(1)
