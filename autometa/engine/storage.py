"""The study in its storage: opening a storage URL, creating or resuming a study with its
stored settings and spaces, reading them back for a process that joins it, which trials
count against the budget (claimed under the storage's lock), dead trials failed and queued
again (a server that went away: :mod:`autometa.engine.outage`)."""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import optuna
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.trial import FrozenTrial, TrialState

from autometa import __version__
from autometa.config import SearchConfig
from autometa.engine.lock import storage_lock
from autometa.engine.outage import is_storage_error
from autometa.engine.prepare import Prepared
from autometa.engine.urls import (
    JOURNAL_SUFFIXES,
    check_folder,
    local_file,
    open_error,
    scheme,
    with_driver,
)
from autometa.errors import ConfigError, PluginError, closest, redact
from autometa.plugins import Kind
from autometa.space import from_json, to_json

log = logging.getLogger(__name__)

#: Study user attribute holding the search's settings (for resuming and for reports).
CONFIG_ATTR = "autometa.config"
#: Seconds between heartbeats of a running trial; a trial silent for GRACE is stale.
HEARTBEAT, GRACE = 10, 30
#: A stale or crashed trial runs again with its parameters, at most this many times.
MAX_RETRY = 2


def heartbeat_storage(study: optuna.Study) -> BaseHeartbeat | None:
    """The study's storage if it records trials' heartbeats (an RDB storage opened with a
    heartbeat interval, see :func:`open_storage`), else None."""
    storage = study._storage  # the study's own storage: Optuna offers no other handle
    if isinstance(storage, BaseHeartbeat) and storage.get_heartbeat_interval():
        return storage
    return None


def retry_callback() -> optuna.storages.RetryHeartbeatStaleTrialCallback:
    """Optuna's callback that queues a failed trial again (WAITING) with its parameters."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)


#: Seconds a SQLite connection waits for another process's write before failing.
SQLITE_BUSY_TIMEOUT = 60


def open_storage(url: str, *, must_exist: bool = False, create_tables: bool = True
                 ) -> optuna.storages.BaseStorage:
    """Open an Optuna storage: a database URL, or the path of a journal file.

    SQLite waits up to :data:`SQLITE_BUSY_TIMEOUT` seconds for other processes' writes;
    RDB storages get heartbeats, so a trial of a process that died is found stale on any
    machine and retried (:data:`GRACE`). A path ending in ``.log``, ``.journal`` or
    ``.jsonl`` is Optuna's journal file storage (local processes, no server).

    Args:
        must_exist: for read-only commands: a file that does not exist is an error instead
            of being created.
        create_tables: False to only read an RDB storage: no table is created and the
            schema's version is not checked (that check may write its version row), so
            nothing is written even to a database another process is creating.

    Raises:
        ConfigError: one line naming the URL with its password replaced by ``***``.
    """
    shown = redact(url)
    kind = scheme(url)
    file = local_file(url)
    if must_exist and file is not None and not file.is_file():
        raise ConfigError(f"storage: no database at {str(file)!r} ({shown}); run a search "
                          "first or give --storage")
    if file is not None:
        check_folder(file, url)
    if kind == "postgres":
        raise ConfigError(f"storage: {shown}: write postgresql://, not postgres:// "
                          "(SQLAlchemy's name for the dialect)")
    if not kind and file is None:
        raise ConfigError(f"storage: {shown} is neither a database URL (sqlite:///x.db, "
                          "postgresql://...) nor a journal file path ending in "
                          f"{', '.join(JOURNAL_SUFFIXES)}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            if not kind:
                from optuna.storages.journal import JournalFileBackend, JournalStorage

                return JournalStorage(JournalFileBackend(str(file)))
            if kind in {"sqlite", "postgresql", "mysql"}:
                # A server's connections are checked before use (pre-ping), so a worker
                # reconnects by itself after the server restarts.
                kwargs = ({"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT}}
                          if kind == "sqlite" else {"pool_pre_ping": True})
                return optuna.storages.RDBStorage(
                    with_driver(url),
                    engine_kwargs=kwargs,
                    heartbeat_interval=HEARTBEAT,
                    grace_period=GRACE,
                    heartbeat_stale_trial_callback=retry_callback(),
                    skip_table_creation=not create_tables,
                    skip_compatibility_check=not create_tables,
                )
            return optuna.storages.get_storage(url)
    except ConfigError:
        raise
    except Exception as exc:
        raise open_error(url, exc) from None


def open_study(prepared: Prepared, sampler: optuna.samplers.BaseSampler,
               pruner: optuna.pruners.BasePruner) -> optuna.Study:
    """Create the study of ``prepared.config`` with its settings, or resume it.

    A resumed study must have been made by autometa with the same settings (the
    fingerprint); it then uses the plugins and spaces it stored.

    Raises:
        ConfigError: the storage cannot be opened, the study is not autometa's, or it was
            run with other settings (the differences listed); nothing is changed then.
    """
    config = prepared.config
    file = local_file(config.storage)
    if file is not None and file.is_file() and file.stat().st_size > 0 \
            and schema_ready(config.storage):
        # An existing file: resuming only reads, so no lock (and no lock file) is needed;
        # tables another process is still creating make this fall through to the lock.
        try:
            storage = open_storage(config.storage, create_tables=False)
            study = _resume(prepared, storage, sampler, pruner)
        except ConfigError:
            raise  # another search's study, other settings: nothing to lock for
        except Exception:  # tables not created yet: create them under the lock
            study = None
        if study is not None:
            return study
    try:
        with storage_lock(config.storage):
            storage = open_storage(config.storage)
            return (_resume(prepared, storage, sampler, pruner)
                    or _create(prepared, storage, sampler, pruner))
    except Exception as exc:  # a server refusing the connection, at the lock or the study
        if is_storage_error(exc):
            raise open_error(config.storage, exc) from None
        raise


def _resume(prepared: Prepared, storage: optuna.storages.BaseStorage,
            sampler: optuna.samplers.BaseSampler,
            pruner: optuna.pruners.BasePruner) -> optuna.Study | None:
    """The stored study of ``prepared.config``, checked; None if there is none."""
    config = prepared.config
    name = config.study
    try:
        study = optuna.load_study(study_name=name, storage=storage, sampler=sampler,
                                  pruner=pruner)
    except KeyError:
        return None
    stored = study.user_attrs.get(CONFIG_ATTR)
    if stored is None:
        raise ConfigError(f"study {name!r} in {redact(config.storage)} was not made by "
                          "autometa; choose another study name")
    # Settings added to autometa after the study was made are not compared.
    given = {k: v for k, v in _jsonable(config.fingerprint()).items()
             if k in stored["fingerprint"]}
    if stored["fingerprint"] != given:
        diff = _diff(stored["fingerprint"], given)
        raise ConfigError(
            f"study {name!r} in {redact(config.storage)} was run with other settings "
            f"({diff}); use the original settings to resume it, or a new study name"
        )
    for key, entry in stored.get("inputs", {}).items():
        mine = prepared.inputs.get(key)
        if mine is not None and mine["sha256"] != entry["sha256"]:
            raise ConfigError(f"{key}: {mine['path']!r} has changed since study {name!r} was "
                              f"created (sha256 {mine['sha256'][:12]}... now, "
                              f"{entry['sha256'][:12]}... then); restore the file, or start a "
                              "new study")
    if "spaces" in stored:
        _use_stored_spaces(prepared, stored["spaces"], name)
    log.info("resuming study %r (%d trials so far)", name, len(study.trials))
    return study


def _create(prepared: Prepared, storage: optuna.storages.BaseStorage,
            sampler: optuna.samplers.BaseSampler,
            pruner: optuna.pruners.BasePruner) -> optuna.Study:
    """A new study with the search's typed settings and resolved spaces (under the lock)."""
    from autometa.engine.initial import describe, enqueue, initial_trials

    config = prepared.config
    name = config.study
    queued = initial_trials(prepared)
    study = optuna.create_study(storage=storage, study_name=name, sampler=sampler,
                                pruner=pruner, direction=prepared.task.metric.direction)
    with warnings.catch_warnings():  # experimental in Optuna; optuna-dashboard shows it
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names([f"meta-val {prepared.task.metric.name}"])
    study.set_user_attr(CONFIG_ATTR, {
        "autometa_version": __version__,
        # The storage URL is each machine's own; stored without its password.
        # Plugins' own options are each machine's (a reporter's token): never stored.
        "config": _jsonable({**{k: v for k, v in config.to_dict().items() if k != "plugins"},
                             "storage": redact(config.storage),
                             "warm_start": [redact(w) for w in config.warm_start]}),
        "fingerprint": _jsonable(config.fingerprint()),
        # SHA-256 of every input file: a worker elsewhere must have the same data.
        "inputs": prepared.inputs,
        "task": prepared.task.describe(),
        # Provenance for reports: who provided each plugin used, at which version.
        "plugins": _plugin_versions(prepared),
        # The plugins and spaces this search resolved: a resume uses exactly these, so a
        # plugin installed or upgraded since cannot change the space Optuna samples from.
        "spaces": {"algorithm": {n: to_json(s) for n, s in prepared.algorithms.items()},
                   "source": {n: to_json(s) for n, s in prepared.sources.items()}},
    })
    if queued:
        enqueue(study, queued)
        log.info("queued %s to run first", ", ".join(f"{n} {k} trial(s)"
                                                    for k, n in describe(queued).items()))
    return study


def _plugin_versions(prepared: Prepared) -> dict[str, dict[str, str]]:
    """``{kind: {name: "distribution version"}}`` of the task and the resolved algorithms
    and sources (``"plugin (in-process)"`` for one registered by code)."""
    host, config = prepared.host, prepared.config
    names = {"task": [config.task], "algorithm": list(prepared.algorithms),
             "source": list(prepared.sources)}
    def origin(kind: str, name: str) -> str:
        reg = host.get(kind, name)  # type: ignore[arg-type]
        return f"{reg.distribution} {reg.version}" if reg.distribution else \
            f"{reg.plugin} (in-process)"

    return {kind: {name: origin(kind, name) for name in group}
            for kind, group in names.items()}


#: Settings of one machine rather than of the search: a process joining a stored study
#: gives its own (the study's storage URL as this machine reaches it, its devices, ...).
MACHINE_KEYS = ("storage", "artifacts", "data_root", "device", "devices", "workers",
                "threads", "timeout", "plugins")


def stored_search(study_name: str, storage: str, **machine: Any
                  ) -> tuple[SearchConfig, dict[str, Any], optuna.Study]:
    """The settings stored by study ``study_name`` in ``storage``, with this machine's own
    :data:`MACHINE_KEYS` (those given and not None; ``data_root`` is never taken from the
    study); the hashes of its input files; the study.

    Raises:
        ConfigError: no such storage or study (the studies there are listed), or a study
            autometa did not make; nothing is created or written.
    """
    from autometa.config import check_study_name

    check_study_name(study_name)
    unknown_keys = set(machine) - set(MACHINE_KEYS)
    if unknown_keys:
        raise ConfigError(f"not a setting of one machine: {', '.join(sorted(unknown_keys))}; "
                          f"these are: {', '.join(MACHINE_KEYS)}")
    def missing(names: list[str]) -> ConfigError:
        return ConfigError(f"no study {study_name!r} in {redact(storage)}"
                           f"{closest(study_name, names)}; studies there: "
                           f"{', '.join(sorted(names)) or 'none'}")

    open_storage(storage, must_exist=True, create_tables=False)  # the URL's own errors
    if not schema_ready(storage):  # no study yet (or its tables are being created now)
        raise missing([])
    store = open_storage(storage, must_exist=True, create_tables=False)
    try:
        study = optuna.load_study(study_name=study_name, storage=store)
    except KeyError:
        raise missing(optuna.get_all_study_names(store)) from None
    stored = study.user_attrs.get(CONFIG_ATTR)
    if stored is None:
        raise ConfigError(f"study {study_name!r} in {redact(storage)} was not made by autometa")
    data = {**stored["config"], "study_name": study_name, "storage": storage, "data_root": None}
    data.update({k: v for k, v in machine.items() if v is not None})
    config = SearchConfig.from_dict(data, where=f"study {study_name!r}")
    return config, stored.get("inputs", {}), study


def _use_stored_spaces(prepared: Prepared, spaces: Mapping[str, Any], study: str) -> None:
    """Replace the freshly resolved plugins and spaces by those ``study`` was created with.

    Raises:
        ConfigError: a plugin the study searched is no longer installed or usable.
    """
    kinds: tuple[tuple[Kind, str], ...] = (("algorithm", "algorithms"), ("source", "sources"))
    for kind, attr in kinds:
        for name in spaces[kind]:
            try:
                prepared.host.get(kind, name).load()
            except PluginError as exc:
                raise ConfigError(f"study {study!r} searched {kind} {name!r}, which is not "
                                  f"usable now ({exc}); reinstall it to resume, or start a new "
                                  "study") from None
        setattr(prepared, attr, {n: from_json(s) for n, s in spaces[kind].items()})


def _jsonable(value: Any) -> Any:
    """Round-trip through JSON types so that stored and fresh settings compare equal."""

    return json.loads(json.dumps(value))


def _diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    changed = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
               if old.get(k) != new.get(k)]
    return "; ".join(changed)


def study_exists(url: str, name: str) -> bool:
    """True if study ``name`` is in the storage at ``url``; creates and writes nothing."""
    file = local_file(url)
    if (file is not None and not file.is_file()) or not schema_ready(url):
        return False
    storage = open_storage(url, create_tables=False)
    return name in optuna.get_all_study_names(storage)


def schema_ready(url: str) -> bool:
    """True once Optuna's tables exist at ``url`` and are stamped with their version.

    Checked with one plain query before a reader opens the storage: Optuna's RDB storage
    writes its version rows when it finds none, even when told to skip creating tables,
    and doing that while another process creates the schema makes that process fail
    ("already exists"). A journal file is always ready once it exists.

    Raises:
        ConfigError: the storage cannot be reached (see :func:`open_storage`).
    """
    if scheme(url) not in {"sqlite", "postgresql", "mysql"}:
        return True
    file = local_file(url)
    if file is not None and not file.is_file():
        return False
    import sqlalchemy

    try:
        engine = sqlalchemy.create_engine(with_driver(url), poolclass=sqlalchemy.pool.NullPool)
    except ConfigError:
        raise
    except Exception as exc:
        raise open_error(url, exc) from None
    try:
        with engine.connect() as connection:
            return connection.execute(
                sqlalchemy.text("SELECT version_num FROM alembic_version")).first() is not None
    except sqlalchemy.exc.ProgrammingError:  # PostgreSQL, MySQL: no such table
        return False
    except sqlalchemy.exc.OperationalError as exc:
        if scheme(url) == "sqlite" and "no such table" in str(exc):
            return False
        raise open_error(url, exc) from None
    except sqlalchemy.exc.DatabaseError as exc:  # e.g. a file that is not a database
        raise open_error(url, exc) from None
    finally:
        engine.dispose()


def counts(trial: FrozenTrial) -> bool:
    """Trials that use up budget: finished ones, except crashed trials that are retried."""
    if trial.state in (TrialState.COMPLETE, TrialState.PRUNED):
        return True
    return trial.state == TrialState.FAIL and "failure" in trial.user_attrs


def budget_used(study: optuna.Study) -> int:
    """Trials that count against ``n_trials``: finished ones (see :func:`counts`) and running
    ones (each will finish, or be found dead and retried)."""
    return sum(1 for t in study.get_trials(deepcopy=False)
               if counts(t) or t.state == TrialState.RUNNING)


#: Trial user attribute naming the process running it: {"host", "pid", "device", "worker"}.
WORKER_ATTR = "worker"


def claim(study: optuna.Study, url: str, n_trials: int | None, deadline: float | None,
          worker: Mapping[str, Any],
          sampler_for: Callable[[int], optuna.samplers.BaseSampler]) -> optuna.Trial | None:
    """A new trial for this process, or None when the budget or the time is spent.

    Under :func:`storage_lock`: dead local trials are failed and queued again first; then
    the trials that count (:func:`budget_used`) are compared with ``n_trials``, so any
    number of workers and processes end with exactly ``n_trials`` finished. A queued
    retry (Optuna's WAITING trial) is taken before a new one is sampled.

    Args:
        sampler_for: the sampler for the trial of a given number (seeded by it, so that
            no two trials share a random stream).
    """
    if deadline is not None and time.time() >= deadline:
        return None
    # The serial section of a search (its cost bounds claims per second on one storage:
    # benchmarks/postgres_workers.py), so it reads the trials once.
    with storage_lock(url):
        fail_dead_trials(study)
        trials = study.get_trials(deepcopy=False)
        used = sum(1 for t in trials if counts(t) or t.state == TrialState.RUNNING)
        if n_trials is not None and used >= n_trials:
            return None
        # ask() takes the first queued (WAITING) trial, else creates trial len(trials).
        waiting = [t.number for t in trials if t.state == TrialState.WAITING]
        study.sampler = sampler_for(min(waiting) if waiting else len(trials))
        with warnings.catch_warnings():  # the worker runs Optuna's heartbeat thread itself
            warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed")
            trial = study.ask()
        # A first heartbeat at once: a process that dies before its heartbeat thread starts
        # must still be found stale (Optuna finds only trials with a beat older than GRACE).
        beat = heartbeat_storage(study)
        if beat is not None:
            beat.record_heartbeat(trial._trial_id)
    # Outside the lock: until it is set, no process fails this trial as dead by its pid
    # (it has none to check yet; its heartbeat is fresh).
    trial.set_user_attr(WORKER_ATTR, {"host": socket.gethostname(), "pid": os.getpid(),
                                      **worker})
    if trial.user_attrs.get("crash"):  # a retry inherits its failed trial's attributes
        trial.set_user_attr("crash", None)
    return trial


def fail_dead_trials(study: optuna.Study) -> list[int]:
    """Fail the RUNNING trials whose process is gone and queue each again (twice at most).

    A process on this machine is checked directly (its pid); one elsewhere by its
    heartbeat (RDB storages, after :data:`GRACE` seconds). Returns the numbers failed here.
    """
    host = socket.gethostname()
    failed = []
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    # Optuna's own query for trials whose heartbeat is older than GRACE (what its
    # fail_stale_trials uses), so that each is failed here with a reason.
    beat = heartbeat_storage(study)
    stale = set(beat._get_stale_trial_ids(study._study_id)) if beat is not None else set()
    for t in running:
        who = t.user_attrs.get(WORKER_ATTR) or {}
        if who.get("host") == host and isinstance(who.get("pid"), int) \
                and not _alive(who["pid"]):
            fail_trial(study, t, f"its process {who['pid']} died")
            failed.append(t.number)
        elif t._trial_id in stale:
            fail_trial(study, t, f"no heartbeat for {GRACE} s from {who.get('host', '?')} "
                                 f"(process {who.get('pid', '?')}): its machine or process "
                                 "was lost")
            failed.append(t.number)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    return failed


def fail_running(study: optuna.Study, url: str, number: int, reason: str) -> None:
    """:func:`fail_trial` for trial ``number`` if it is still RUNNING (under the lock)."""
    with storage_lock(url):
        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if trial.number == number:
                fail_trial(study, trial, reason)


def fail_trial(study: optuna.Study, trial: FrozenTrial, reason: str) -> None:
    """Mark a RUNNING ``trial`` FAIL (not counted against the budget) and queue it again."""
    storage = study._storage  # the study's own storage object: Optuna offers no other handle
    try:
        storage.set_trial_user_attr(trial._trial_id, "crash", reason)
        if not storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL):
            return
    except optuna.exceptions.UpdateFinishedTrialError:
        return  # another process got there first
    level = logging.INFO if reason.startswith("interrupted") else logging.WARNING
    log.log(level, "trial %d failed: %s; it will run again", trial.number, reason)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry_callback()(study, storage.get_trial(trial._trial_id))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
