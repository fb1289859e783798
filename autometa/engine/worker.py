"""A worker: claims trials against the study's budget, runs each one, reports to the display.

One worker runs one trial at a time on one device. It owns nothing but its device: the
study's settings come from the storage, the budget is counted there
(:func:`~autometa.engine.claim.claim`), and what it does is sent as events to whoever
draws the display (the calling process itself, or the pool's supervisor).

An event is ``(method, args)`` naming a :class:`~autometa.progress.Progress` method:
``trial_started``, ``step``, ``evaluated``, ``trial_status`` (the trial's phase: meta-train,
evaluating meta-val, scoring on meta-test; or ``done`` of ``total`` units of work that
plugin code reports inside the trial with :func:`autometa.work.report`, such as a source's
pre-training), ``trial_finished``; and ``claimed`` (a trial number, before its parameters
are sampled) for a pool's supervisor.
"""

from __future__ import annotations

import gc
import logging
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
import torch
from optuna.trial import TrialState

from autometa import work
from autometa.config import SearchConfig
from autometa.engine.claim import claim, fail_running
from autometa.engine.heartbeat import Heartbeat
from autometa.engine.lock import storage_lock
from autometa.engine.outage import (
    Outage,
    StorageFault,
    is_storage_error,
    stop_search,
    stops_search,
)
from autometa.engine.prepare import Prepared, prepare
from autometa.engine.sampling import strategy, trial_sampler
from autometa.engine.signals import Interrupted, raise_if_stopped, stop_on_signals
from autometa.engine.storage import open_study
from autometa.errors import one_line, redact
from autometa.events import TrialFailed, TrialFinished, TrialPruned, TrialStarted
from autometa.plugins import PluginHost, create_host
from autometa.precision import autocast
from autometa.space import suggest
from autometa.study.artifacts import keep_best, open_store, upload_state
from autometa.study.baselines import is_baseline, searched
from autometa.study.build import trial_defaults
from autometa.study.completion import is_completion
from autometa.study.trials import (
    COST_ATTRS,
    CURVE_ATTR,
    MAX_VAL_SCORES,
    PRUNED_ATTR,
    STOPPED_ATTR,
    TEST_ATTRS,
    VAL_SCORES_ATTR,
    TrialPlan,
    rank_key,
    ranked,
    record_test,
    trial_seed,
)
from autometa.trial import (
    Clock,
    Diverged,
    EvaluationPruned,
    build,
    meta_train,
    paired_val_score,
    score_meta_test,
)

if TYPE_CHECKING:
    from optuna.artifacts._protocol import ArtifactStore

    from autometa.algorithm import MetaAlgorithm

log = logging.getLogger(__name__)

Event = tuple[str, tuple[Any, ...]]
#: Seconds between two ``step`` events of a trial (the display needs no more).
STEP_EVENT_EVERY = 0.2
#: Seconds between two looks at the study while waiting for trials running elsewhere.
WAIT_POLL = 5.0


@dataclass(frozen=True)
class WorkerSpec:
    """What one worker needs; picklable, so that a pool can send it to a child process."""

    config: dict[str, Any]  # the prepared (typed) SearchConfig, as a dict
    device: str  # this worker's torch device
    index: int = 0  # the worker's number in its pool
    threads: int | None = None  # torch intra-op threads in this worker (None: torch's)
    deadline: float | None = None  # time.time() after which no trial starts
    out: str | None = None  # the report folder plugins' hooks are told (event.out)


def run_worker(spec: WorkerSpec, send: Callable[[Event], None], *,
               host: PluginHost | None = None, prepared: Prepared | None = None,
               keep_going: Callable[[], bool] = lambda: True) -> int:
    """Run trials until the study's budget or the deadline is spent; returns how many.

    Once the budget is claimed, the worker stays while trials run elsewhere, and runs again
    any whose process dies (found by its pid on this machine, by its heartbeat from
    another).

    ``prepared`` skips the preparation (the calling process has done it on this device);
    ``keep_going`` is asked before each claim (a pool's worker stops when its supervisor
    is gone).
    """
    if spec.threads:
        torch.set_num_threads(spec.threads)
    if prepared is None:
        config = SearchConfig.from_dict(spec.config, where="stored settings")
        prepared = prepare(replace(config, device=spec.device, devices=[spec.device]),
                           host or create_host(), check_options=False)
    config = prepared.config
    host = prepared.host
    study = open_study(prepared, *strategy(config, host, prepared.task.metric.direction))
    store = open_store(config.artifacts, study.study_name)
    # Every searched algorithm ends with a fully trained trial (engine.completion), unless
    # nothing prunes.
    complete = list(prepared.algorithms) if config.pruner != "none" else []
    ran, waiting = 0, False
    outage = Outage(study, config.storage)
    while keep_going():
        raise_if_stopped()  # a SIGTERM whose exception was lost
        try:
            trial = claim(study, config.storage, config.n_trials, spec.deadline,
                          {"device": spec.device, "worker": spec.index},
                          lambda number: trial_sampler(config.seed, number,
                                                       config.sampler, study.study_name,
                                                       host),
                          complete)
            elsewhere = [] if trial else study.get_trials(deepcopy=False,
                                                          states=(TrialState.RUNNING,))
        except Exception as exc:
            stop_search(exc, config.storage, config.artifacts)
            if not is_storage_error(exc):
                raise
            outage.wait(exc)
            continue
        outage.ended()
        if trial is None:
            # The budget is claimed, but a trial running elsewhere may yet die (a machine
            # lost): stay until none runs, to run it again if it does (claim() fails it
            # once its process is gone or its heartbeat stale).
            if not elsewhere or (spec.deadline is not None and time.time() >= spec.deadline):
                return ran
            if not waiting:
                send(("phase", (f"budget claimed; waiting for {len(elsewhere)} trial(s) "
                                "running elsewhere (any whose process dies runs again here)",)))
                waiting = True
            time.sleep(WAIT_POLL)
            continue
        waiting = False
        send(("claimed", (trial.number,)))
        try:
            run_trial(study, trial, prepared, store, send, device=spec.device,
                      out=None if spec.out is None else Path(spec.out))
        except Exception as exc:
            stop_search(exc, config.storage, config.artifacts, study, trial.number)
            if not is_storage_error(exc):
                fail_running(study, config.storage, trial.number, "interrupted")
                raise
            # The server went away while this trial wrote to it: once it is back, the
            # trial is failed and queued again (its progress is lost), and work goes on.
            outage.wait(exc)
            fail_running(study, config.storage, trial.number,
                         "the storage was unreachable while it ran")
            send(("trial_finished", (trial.number, "FAIL", None,
                                     "storage unreachable; it will run again", True)))
            continue
        except BaseException as exc:  # Ctrl-C, SIGTERM: the trial runs again on resume
            fail_running(study, config.storage, trial.number, interruption(exc))
            raise
        ran += 1
    return ran


def interruption(exc: BaseException) -> str:
    """The failure reason of a trial that ``exc`` (not an ``Exception``) interrupted."""
    if isinstance(exc, Interrupted):
        return exc.reason
    return "interrupted (Ctrl-C)" if isinstance(exc, KeyboardInterrupt) else "interrupted"


def run_trial(study: optuna.Study, trial: optuna.Trial, prepared: Prepared,
              store: ArtifactStore, send: Callable[[Event], None], *, device: str,
              out: Path | None = None) -> None:
    """Sample ``trial``'s configuration, meta-train it, upload its state to ``store`` and
    tell the study how it ended.

    Any exception inside the trial fails it with its reason (``user_attrs["failure"]``)
    and the worker goes on; a pruned trial keeps its last meta-val score. A storage that
    cannot be reached is not the trial's fault: that error is raised to the worker.
    """
    config, task, host = prepared.config, prepared.task, prepared.host
    baseline = is_baseline(trial)
    completion = is_completion(trial)  # a pruned configuration run again: never pruned
    if baseline:  # its plan was fixed when it was queued: nothing is sampled
        plan = TrialPlan.of(trial)
    else:
        plan = sample_plan(trial, prepared)
        for key, value in vars(plan).items():
            trial.set_user_attr(key, value)
    inherited = trial.user_attrs  # a retry copies its failed trial's attributes
    for key in (*COST_ATTRS, *TEST_ATTRS, "test_failure", "failure", PRUNED_ATTR,
                CURVE_ATTR, VAL_SCORES_ATTR, STOPPED_ATTR):
        if inherited.get(key) is not None:  # the failed trial's, not this one's
            trial.set_user_attr(key, None)
    kind = "baseline " if baseline else "completion " if completion else ""
    send(("trial_started", (trial.number, kind
                            + plan.describe(trial_defaults(task)),
                            config.meta_steps, device)))
    host.notify("trial_started", TrialStarted(
        study.study_name, number=trial.number, algorithm=plan.algorithm, source=plan.source,
        params=dict(trial.params), device=device, out=out), config.plugins)
    seed = trial_seed(config.seed, trial.number)
    last = [0.0]

    def on_step(step: int) -> None:
        raise_if_stopped()  # a SIGTERM whose exception was lost
        now = time.monotonic()
        if now - last[0] >= STEP_EVENT_EVERY:
            last[0] = now
            send(("step", (trial.number, step)))

    paired = config.pruner == "wilcoxon"  # steps are meta-val episodes, not meta-steps
    seconds = config.pruner_resource == "seconds"  # steps are seconds of meta-training
    curve: list[list[float]] = []
    clock, reported = Clock(), [-1]

    def on_eval(step: int, score: float) -> None:
        send(("evaluated", (trial.number, step, score)))
        if paired or seconds:
            curve.append([step, score])
        at = int(clock.train_s) if seconds else step
        if paired or at <= reported[0]:  # a second already reported: Optuna keeps the first
            return
        reported[0] = at
        trial.report(score, at)
        # Never after the last evaluation (its budget of steps or seconds is spent): a
        # pruner's rung there (Hyperband's largest budget) would throw away a finished model.
        last = step >= config.meta_steps or clock.timed_out
        if 0 < step and not last and not completion and trial.should_prune():
            raise optuna.TrialPruned(f"{config.pruner}: meta-val {score:.4g} at step {step}"
                                     + (f" ({at} s)" if seconds else ""))

    def final_score(algorithm: MetaAlgorithm) -> float:
        send(("trial_status", (trial.number, "meta-val, paired with the best")))
        order = torch.Generator().manual_seed(seed)
        return paired_val_score(algorithm, task, generator=order,
                                report=lambda episode, score: trial.report(score, episode),
                                should_stop=(lambda: False) if completion
                                else trial.should_prune)

    final: list[float] = []  # the last meta-val scores, per episode (paired with baselines')

    def on_final_scores(scores: torch.Tensor) -> None:
        if len(scores) <= MAX_VAL_SCORES:
            final[:] = [round(v, 7) for v in scores.tolist()]

    state, value, note = TrialState.COMPLETE, None, ""
    test = None

    def on_phase(name: str) -> None:
        if clock.steps:  # the step it stopped at (step events are sent a few times a second)
            send(("step", (trial.number, clock.steps)))
        send(("trial_status", (trial.number, name)))

    def on_work(what: str, done: int, total: int) -> None:  # e.g. a source's pre-training
        send(("trial_status", (trial.number, what, done, total)))

    if task.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(task.device)
    with Heartbeat(study, trial, config.storage), work.reporting(on_work):
        try:
            generator = torch.Generator(device=task.device).manual_seed(seed)
            algorithm = build(host, task, plan, seed, prepared.root)
            # The trial's precision: meta-steps, meta-val and meta-test, not the building
            # (a source's pre-training is shared by every trial).
            with autocast(plan.precision, task.device):
                value = meta_train(algorithm, task, meta_steps=config.meta_steps,
                                   eval_every=config.eval_every, generator=generator,
                                   on_eval=on_eval, on_step=on_step, clock=clock,
                                   final_score=final_score if paired else None,
                                   on_final_scores=on_final_scores,
                                   time_limit=config.trial_timeout,
                                   on_phase=on_phase)
            upload_state(algorithm, trial, store)
            if baseline or completion or ahead(study, trial.number, value,
                                 task.metric.direction) < config.top_k:
                # Among the best top_k so far, it may be listed with a test score: score it
                # now, while the model is in memory (the leaderboard then has nothing to do;
                # a trial outside the top_k can never enter it later). A baseline is
                # always listed with one, and so is a completion trial (its algorithm's
                # only fully trained trial).
                send(("trial_status", (trial.number, "scoring on meta-test")))
                test = score_meta_test(algorithm, task, precision=plan.precision)
        except optuna.TrialPruned as exc:
            state, note = TrialState.PRUNED, str(exc)
        except EvaluationPruned as exc:
            # Told COMPLETE with its running mean, as Optuna advises for this pruner (the
            # sampler learns from it); marked, so that it is never ranked.
            value, note = exc.mean, str(exc)
        except Diverged as exc:
            state, note = TrialState.FAIL, f"diverged: {exc}"
        except Exception as exc:  # this trial's data, hyperparameters or plugin code
            if is_storage_error(exc) or stops_search(exc):
                raise  # the storage's fault or a full disk's, not the trial's
            log.debug("trial %d failed", trial.number, exc_info=True)
            state, note = TrialState.FAIL, f"{type(exc).__name__}: {redact(one_line(str(exc)))}"
        finally:
            algorithm = None  # type: ignore[assignment]  # free the device before the next
            _release_device_memory(task.device)
    try:
        record_costs(trial, clock, task.device)
        if paired or seconds:  # the learning curve in meta-steps
            trial.set_user_attr(CURVE_ATTR, curve)
        if not paired and state == TrialState.COMPLETE and final:
            trial.set_user_attr(VAL_SCORES_ATTR, final)
        if state == TrialState.COMPLETE and note:
            trial.set_user_attr(PRUNED_ATTR, note)
        if test is not None:
            record_test(trial, test)
        if state == TrialState.FAIL:
            trial.set_user_attr("failure", note[:1000])
        frozen = study.tell(trial, value if state == TrialState.COMPLETE else None,
                            state=state)
    except optuna.exceptions.UpdateFinishedTrialError:
        # Its heartbeats stopped reaching the storage for GRACE seconds (an outage), so
        # another worker failed it and queued it again: that retry's result counts.
        log.warning("trial %d was failed as stale meanwhile; this result is dropped",
                    trial.number)
        send(("trial_finished", (trial.number, "FAIL", None, "taken over as stale", True)))
        return
    if state == TrialState.COMPLETE and config.keep != "all":
        try:
            with storage_lock(config.storage):
                keep_best(study, store, config.keep)
        except Exception as exc:  # the trial is told: a later trial's clean-up catches up
            log.warning("could not remove the states beyond the best %s: %s", config.keep,
                        redact(one_line(str(exc))))
    shown = "PRUNED" if note and state == TrialState.COMPLETE else state.name
    cut = f"stopped at trial_timeout after {clock.steps:,} meta-steps" if clock.timed_out \
        else ""
    send(("trial_finished", (trial.number, shown, value, note or cut)))
    name, plugins = study.study_name, config.plugins
    if shown == "PRUNED":
        host.notify("trial_pruned", TrialPruned(name, trial=frozen, step=frozen.last_step,
                                                reason=note, out=out), plugins)
    elif state == TrialState.FAIL:
        host.notify("trial_failed", TrialFailed(name, trial=frozen, error=note, out=out),
                    plugins)
    host.notify("trial_finished", TrialFinished(name, trial=frozen, out=out), plugins,
                study_name=name, trial=frozen)


def sample_plan(trial: optuna.Trial, prepared: Prepared) -> TrialPlan:
    """A searched trial's plan, sampled from the search's spaces; a searched precision
    (a list in the settings) is the categorical parameter ``precision``."""
    algorithm = trial.suggest_categorical("algorithm", list(prepared.algorithms))
    source = trial.suggest_categorical("source", list(prepared.sources))
    precision = prepared.config.precision
    return TrialPlan(algorithm, source,
                     suggest(trial, algorithm, prepared.algorithms[algorithm]),
                     suggest(trial, source, prepared.sources[source]),
                     # "task.<name>"; fixed ones (a name not given: its default) recorded too
                     suggest(trial, "task", prepared.task_space),
                     trial.suggest_categorical("precision", precision)
                     if isinstance(precision, list) else precision)


def ahead(study: optuna.Study, number: int, value: float, direction: str) -> int:
    """How many completed searched trials rank before trial ``number`` scoring ``value``
    (meta-val; ties go to the lower trial number, as on the leaderboard). Baselines take
    no place among the ``top_k``: they are scored anyway. A count, so the ranking's order
    (and the paired tests behind it, :func:`~autometa.study.trials.prefer_baselines`) is
    not computed here, after every trial."""
    key = rank_key(direction, value, number)
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return sum(rank_key(direction, float(t.value), t.number) < key
               for t in searched([t for t in complete if ranked(t)]))


def record_costs(trial: optuna.Trial, clock: Clock, device: torch.device) -> None:
    """Store the trial's times (and peak CUDA memory) as its user attributes
    (:data:`~autometa.study.trials.COST_ATTRS`), and where meta-training stopped if it
    reached ``trial_timeout`` (:data:`~autometa.study.trials.STOPPED_ATTR`)."""
    trial.set_user_attr("fit_time_s", round(clock.train_s, 3))
    trial.set_user_attr("meta_steps", clock.steps)
    if clock.timed_out:
        trial.set_user_attr(STOPPED_ATTR, {"step": clock.steps,
                                           "seconds": round(clock.train_s, 3)})
    if clock.eval_episodes:
        trial.set_user_attr("adapt_ms", round(clock.adapt_ms, 4))
    if device.type == "cuda":
        trial.set_user_attr("peak_mem_mb",
                            round(torch.cuda.max_memory_allocated(device) / 2**20, 1))


def _release_device_memory(device: torch.device) -> None:
    """Return a CUDA device's blocks after a trial, so the next starts at its baseline
    (reference cycles in a plugin's objects would otherwise hold tensors until a later
    collection)."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


def worker_main(spec: WorkerSpec, queue: Any, stopped_for: Any = None) -> None:
    """Entry point of a pool's child process: run trials, sending events to ``queue``.

    The child ignores Ctrl-C (the supervisor owns the terminal and stops workers itself)
    and fixes its CUDA device before any CUDA work. SIGTERM and SIGHUP (the supervisor's
    stop, or a scheduler's signal to every process) fail its trial as interrupted, queued
    again, and end it with code 128 + the signal's number; so does the end of its
    supervisor (even ``kill -9``): no orphan keeps computing.

    Args:
        stopped_for: a shared ``multiprocessing.Array`` of bytes where the supervisor
            writes why it stops the pool (``Ctrl-C``), said in the trial's reason.
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

    parent = multiprocessing.parent_process()
    supervisor = parent.pid if parent is not None else os.getppid()
    orphaned = threading.Event()
    if parent is not None:
        threading.Thread(target=_stop_when_gone, args=(parent, orphaned), daemon=True,
                         name="supervisor-watch").start()

    def why(name: str) -> str:
        if orphaned.is_set():
            return f"{name}: its supervising process ended"
        told = stopped_for.value.decode() if stopped_for is not None else ""
        return told or name

    try:
        with stop_on_signals(why):
            run_worker(spec, send, keep_going=lambda: os.getppid() == supervisor)
    except StorageFault as exc:  # the supervisor stops the pool and says it in one line
        send(("storage_fault", (str(exc),)))
        queue.close()
        queue.join_thread()
        os._exit(2)
    except Interrupted as exc:  # its trial is failed and queued again (run_worker)
        queue.cancel_join_thread()  # events nobody may read must not hold the exit
        os._exit(exc.exit_code)
    except Exception as exc:
        send(("worker_failed", (f"{type(exc).__name__}: {redact(one_line(str(exc)))}",)))
        queue.close()
        queue.join_thread()  # the message is sent before the process ends
        os._exit(1)


def _stop_when_gone(parent: Any, orphaned: threading.Event) -> None:
    """Wait for the supervising process to end (its sentinel: no polling), then stop this
    worker as its SIGTERM would."""
    parent.join()
    orphaned.set()
    os.kill(os.getpid(), signal.SIGTERM)
