"""The study in its storage, as a search creates or resumes it: a new study gets the
search's typed settings, input hashes, resolved plugins and spaces and its queued
baseline and initial trials; an existing one must have been made with the same settings,
and resumes with the plugins and spaces it stored. What a stored study holds, and how it
is read back, is :mod:`autometa.study`; the budget and dead trials are
:mod:`autometa.engine.claim`."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping
from typing import Any

import optuna

from autometa.config import FINGERPRINT_SINCE
from autometa.engine.baselines import baseline_plans, enqueue_baselines
from autometa.engine.initial import describe, enqueue, initial_trials
from autometa.engine.lock import storage_lock
from autometa.engine.outage import fault_error, is_storage_error
from autometa.engine.prepare import Prepared
from autometa.errors import ConfigError, PluginError, redact
from autometa.plugins import Kind
from autometa.space import from_json, to_json
from autometa.study.build import declared_trial_params
from autometa.study.settings import CONFIG_ATTR, creation_interrupted, jsonable
from autometa.study.storage import lasting_fault, open_storage, remove_new_file, schema_ready
from autometa.study.trials import TrialPlan
from autometa.study.urls import local_file, open_error
from autometa.version import __version__

log = logging.getLogger(__name__)


def open_study(prepared: Prepared, sampler: optuna.samplers.BaseSampler,
               pruner: optuna.pruners.BasePruner) -> optuna.Study:
    """Create the study of ``prepared.config`` with its settings, or resume it.

    A resumed study must have been made by autometa with the same settings (the
    fingerprint); it then uses the plugins and spaces it stored. A study whose creation
    was interrupted (:func:`~autometa.study.settings.creation_interrupted`) is made again.

    Raises:
        ConfigError: the storage cannot be opened or written (read-only, full, tables of
            another Optuna version), the study is not autometa's, or it was run with other
            settings (the differences listed); nothing is changed then, and a storage file
            or lock file this call created is removed.
    """
    config = prepared.config
    file = local_file(config.storage)
    if file is not None and file.is_file() and file.stat().st_size > 0 \
            and schema_ready(config.storage):
        # An existing file: resuming only reads, so no lock (and no lock file) is needed;
        # tables another process is still creating, or a study it is creating, make this
        # fall through to the lock.
        try:
            storage = open_storage(config.storage, create_tables=False)
            _check_schema(storage)
            study = _resume(prepared, storage, sampler, pruner)
        except ConfigError:
            raise  # another search's study, other settings: nothing to lock for
        except Exception as exc:  # tables not created yet: create them under the lock
            fault = lasting_fault(exc)
            if fault is not None:  # tables of another Optuna version
                raise fault_error(f"storage {config.storage}", fault) from None
            study = None
        if study is not None:
            return study
    try:
        with storage_lock(config.storage, tidy=True):
            new = file is not None and not file.exists()
            try:
                storage = open_storage(config.storage)
                try:
                    return (_resume(prepared, storage, sampler, pruner)
                            or _create(prepared, storage, sampler, pruner))
                except _Interrupted:
                    log.warning("finishing study %r, whose creation was interrupted",
                                config.study)
                    optuna.delete_study(study_name=config.study, storage=storage)
                    return _create(prepared, storage, sampler, pruner)
            except BaseException:
                # Nobody else has used it: this process held the lock throughout.
                if new and file is not None:
                    remove_new_file(file)
                raise
    except ConfigError:
        raise
    except Exception as exc:  # a server refusing the connection, at the lock or the study
        fault = lasting_fault(exc)
        if fault is not None:  # a read-only or full disk, a user who may not write
            raise fault_error(f"storage {config.storage}", fault) from None
        if is_storage_error(exc):
            raise open_error(config.storage, exc) from None
        raise


class _Interrupted(Exception):
    """The study exists, but its creation was interrupted (see :func:`open_study`)."""


def _check_schema(storage: optuna.storages.BaseStorage) -> None:
    """Raise Optuna's RuntimeError if ``storage``'s tables belong to another Optuna version
    (a storage opened only to read skips that check, so a resume makes it here; it reads
    only)."""
    if isinstance(storage, optuna.storages.RDBStorage):
        storage._version_manager.check_table_schema_compatibility()


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
    if stored is None and creation_interrupted(study):
        raise _Interrupted(name)
    if stored is None:
        raise ConfigError(f"study {name!r} in {redact(config.storage)} was not made by "
                          "autometa; choose another study name")
    # Settings added to autometa after the study was made are not compared, but for
    # those whose value such a study ran with is known (FINGERPRINT_SINCE).
    made = {**FINGERPRINT_SINCE, **stored["fingerprint"]}
    given = {k: v for k, v in jsonable(config.fingerprint()).items() if k in made}
    if made != given:
        diff = _diff(made, given)
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
    config = prepared.config
    name = config.study
    baselines = baseline_plans(prepared)
    queued = initial_trials(prepared)
    study = optuna.create_study(storage=storage, study_name=name, sampler=sampler,
                                pruner=pruner, direction=prepared.task.metric.direction)
    try:
        with warnings.catch_warnings():  # experimental in Optuna; optuna-dashboard shows it
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names([f"meta-val {prepared.task.metric.name}"])
        if baselines:  # first: they are cheap, and take no budget
            enqueue_baselines(study, baselines)
            log.info("queued %d baseline trial(s) to run first (no budget used)",
                     len(baselines))
        if queued:
            enqueue(study, queued)
            log.info("queued %s to run first", ", ".join(f"{n} {k} trial(s)"
                                                        for k, n in describe(queued).items()))
        # Last: a study holding its settings is whole. A crash before this line leaves one
        # that the next run makes again (creation_interrupted).
        study.set_user_attr(CONFIG_ATTR, _settings(prepared, baselines))
    except BaseException:
        try:  # a full disk, Ctrl-C: leave the name free (else the next run makes it again)
            optuna.delete_study(study_name=name, storage=storage)
        except Exception:
            log.debug("could not delete the half-made study %r", name, exc_info=True)
        raise
    return study


def _settings(prepared: Prepared, baselines: list[TrialPlan]) -> dict[str, Any]:
    """What a new study stores as :data:`CONFIG_ATTR` (see :mod:`autometa.study.settings`)."""
    config = prepared.config
    return {
        "autometa_version": __version__,
        # The storage URL is each machine's own; stored without its password.
        # Plugins' own options are each machine's (a reporter's token): never stored.
        # So is the cache directory (a path on this machine).
        "config": jsonable({**{k: v for k, v in config.to_dict().items()
                               if k not in ("plugins", "cache_dir")},
                             "storage": redact(config.storage),
                             "warm_start": [redact(w) for w in config.warm_start]}),
        "fingerprint": jsonable(config.fingerprint()),
        # SHA-256 of every input file: a worker elsewhere must have the same data.
        "inputs": prepared.inputs,
        "task": prepared.task.describe(),
        # Provenance for reports: who provided each plugin used, at which version.
        "plugins": _plugin_versions(prepared, baselines),
        # The plugins and spaces this search resolved: a resume uses exactly these, so a
        # plugin installed or upgraded since cannot change the space Optuna samples from.
        "spaces": {"algorithm": {n: to_json(s) for n, s in prepared.algorithms.items()},
                   "source": {n: to_json(s) for n, s in prepared.sources.items()},
                   "task": to_json(prepared.task_space)},
    }


def _plugin_versions(prepared: Prepared, baselines: list[TrialPlan]
                    ) -> dict[str, dict[str, str]]:
    """``{kind: {name: "distribution version"}}`` of the task, the resolved algorithms
    and sources and those of the ``baselines`` (``"plugin (in-process)"`` for one
    registered by code)."""
    host, config = prepared.host, prepared.config
    names = {"task": [config.task],
             "algorithm": list(dict.fromkeys([*prepared.algorithms,
                                              *(p.algorithm for p in baselines)])),
             "source": list(dict.fromkeys([*prepared.sources, *(p.source for p in baselines)]))}
    def origin(kind: str, name: str) -> str:
        reg = host.get(kind, name)  # type: ignore[arg-type]
        return f"{reg.distribution} {reg.version}" if reg.distribution else \
            f"{reg.plugin} (in-process)"

    return {kind: {name: origin(kind, name) for name in group}
            for kind, group in names.items()}


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
    # A study made before tasks had per-trial settings stored none: it runs the defaults.
    if "task" in spaces:
        declared = declared_trial_params(prepared.host.get("task", prepared.config.task).load())
        gone = sorted(set(spaces["task"]) - set(declared))
        if gone:
            raise ConfigError(f"study {study!r} drew the task's {', '.join(map(repr, gone))} "
                              f"per trial, which task {prepared.config.task!r} no longer "
                              "declares in trial_params; install the version it was made "
                              "with to resume, or start a new study")
        prepared.task_space = from_json(spaces["task"])


def _diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    changed = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
               if old.get(k) != new.get(k)]
    return "; ".join(changed)


