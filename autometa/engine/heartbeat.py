"""A running trial's heartbeat: recorded every few seconds in a thread, so that a trial of
a process that dies is found stale on any machine; each beat also fails and queues again
the study's stale trials (a lost machine's), whatever the other workers are doing."""

from __future__ import annotations

import logging
import threading

import optuna

from autometa.engine.claim import fail_dead_trials, heartbeat_storage
from autometa.engine.lock import storage_lock

log = logging.getLogger(__name__)


class Heartbeat:
    """Records ``trial``'s heartbeat every ``heartbeat_interval`` seconds in a thread, as
    Optuna's ``study.optimize`` does, so that a trial of a process that dies is found stale
    on any machine; a no-op for storages without heartbeats.

    Unlike Optuna's thread (which ends at the first error), a beat that fails (the server
    restarting) is skipped and the next one tried, so a short outage does not make a
    running trial look dead.

    Each beat also looks for the study's stale trials (a lost machine's: silent for
    :data:`~autometa.study.storage.GRACE` seconds) and fails and queues them again
    (:func:`~autometa.engine.claim.fail_dead_trials`), so that a lost trial runs again
    within ``GRACE`` + one interval of its last beat while every worker is busy with a
    long trial: claiming finds them too, but a busy worker claims only when its trial
    ends. The look is one query; the storage lock is taken only when it finds one, and
    under it each is failed once however many workers find it at the same time.
    """

    def __init__(self, study: optuna.Study, trial: optuna.Trial, url: str) -> None:
        self._study, self._url = study, url
        self._beat = heartbeat_storage(study)
        self._interval = self._beat.get_heartbeat_interval() if self._beat else None
        self._trial_id = trial._trial_id
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Heartbeat:
        if self._beat is not None and self._interval:
            self._thread = threading.Thread(target=self._run, daemon=True,
                                            name=f"heartbeat-{self._trial_id}")
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        assert self._beat is not None and self._interval
        while True:
            try:
                self._beat.record_heartbeat(self._trial_id)
                # Optuna's own query (what its fail_stale_trials uses), outside the lock.
                if self._beat._get_stale_trial_ids(self._study._study_id):
                    with storage_lock(self._url):
                        fail_dead_trials(self._study)
            except Exception as exc:  # the storage is unreachable: try again next beat
                log.debug("heartbeat of trial id %d failed: %s", self._trial_id, exc)
            if self._stop.wait(self._interval):
                return
