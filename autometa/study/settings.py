"""The search's settings as a study stores them, and read back by a process that joins
it or reads it (a worker on another machine, a leaderboard, a model handed back).

The study user attribute :data:`CONFIG_ATTR` holds::

    {"autometa_version": ..., "config": {settings, the storage URL without its password},
     "fingerprint": {what a resume must match}, "inputs": {setting: {"path", "sha256"}},
     "task": {kind, shapes, metric}, "plugins": {kind: {name: "distribution version"}},
     "spaces": {"algorithm": {...}, "source": {...}, "task": {per-trial settings}}}
"""

from __future__ import annotations

import json
from typing import Any

import optuna
from optuna.trial import TrialState

from autometa.config import SearchConfig, check_study_name
from autometa.errors import ConfigError, closest, redact
from autometa.study.storage import open_storage, schema_ready

#: Study user attribute holding the search's settings (for resuming and for reports).
CONFIG_ATTR = "autometa.config"


def stored_settings(study: Any) -> dict[str, Any]:
    """What ``study`` (an Optuna study) stored about its search (:data:`CONFIG_ATTR`; empty
    for a study autometa did not make)."""
    value = study.user_attrs.get(CONFIG_ATTR)
    return dict(value) if isinstance(value, dict) else {}


#: The user attributes autometa's queued trials carry before they run: an initial
#: configuration's origin, a baseline's mark and plan (:class:`~autometa.study.trials.TrialPlan`).
QUEUED_ATTRS = frozenset({"origin", "baseline", "algorithm", "source", "algorithm_params",
                          "source_params", "task_params"})


def creation_interrupted(study: Any) -> bool:
    """True for a study that autometa began to create and did not finish (a process killed
    in between): no user attribute at all (its settings, :data:`CONFIG_ATTR`, are written
    last), and no trial but queued ones carrying only :data:`QUEUED_ATTRS`. Nothing in it
    has run, so it can be made again; a study holding anything else is never taken for one.
    """
    if study.user_attrs:
        return False
    return all(t.state == TrialState.WAITING and t.user_attrs
               and set(t.user_attrs) <= QUEUED_ATTRS for t in study.get_trials(deepcopy=False))


def search_seed(study: Any) -> int:
    """The seed of the search that made ``study`` (0 if it stored none)."""
    return int(stored_settings(study).get("config", {}).get("seed", 0))


#: Settings of one machine rather than of the search: a process joining a stored study
#: gives its own (the study's storage URL as this machine reaches it, its devices, ...).
MACHINE_KEYS = ("storage", "artifacts", "data_root", "cache_dir", "device", "devices",
                "workers", "threads", "timeout", "plugins")


def stored_search(study_name: str, storage: str, **machine: Any
                  ) -> tuple[SearchConfig, dict[str, Any], optuna.Study]:
    """The settings stored by study ``study_name`` in ``storage``, with this machine's own
    :data:`MACHINE_KEYS` (those given and not None; ``data_root`` is never taken from the
    study); the hashes of its input files; the study.

    Raises:
        ConfigError: no such storage or study (the studies there are listed), or a study
            autometa did not make; nothing is created or written.
    """
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
    if stored is None and creation_interrupted(study):
        raise ConfigError(f"study {study_name!r} in {redact(storage)} is being created, or its "
                          "creation was interrupted; wait for it, or finish it with `autometa "
                          "run` and the study's settings")
    if stored is None:
        raise ConfigError(f"study {study_name!r} in {redact(storage)} was not made by autometa")
    data = {**stored["config"], "study_name": study_name, "storage": storage, "data_root": None,
            "cache_dir": None}
    data.update({k: v for k, v in machine.items() if v is not None})
    config = SearchConfig.from_dict(data, where=f"study {study_name!r}")
    return config, stored.get("inputs", {}), study


def jsonable(value: Any) -> Any:
    """Round-trip through JSON types so that stored and fresh settings compare equal."""
    return json.loads(json.dumps(value))
