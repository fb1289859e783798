"""The study in its storage: opening a storage URL, creating or resuming a study with its
stored settings and spaces, and which trials count against the budget."""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from autometa import __version__
from autometa.engine.prepare import Prepared
from autometa.errors import ConfigError, PluginError, one_line, redact
from autometa.plugins import Kind
from autometa.space import from_json, to_json

log = logging.getLogger(__name__)

#: Study user attribute holding the search's settings (for resuming and for reports).
CONFIG_ATTR = "autometa.config"
#: Seconds between heartbeats of a running trial; a trial silent for GRACE is stale.
HEARTBEAT, GRACE = 10, 30


def open_storage(url: str, *, must_exist: bool = False) -> optuna.storages.BaseStorage:
    """Open an Optuna storage URL; RDB storages get heartbeats so crashed trials are retried.

    Args:
        must_exist: for read-only commands: a SQLite file that does not exist is an error
            instead of being created.

    Raises:
        ConfigError: one line naming the URL with its password replaced by ``***``.
    """
    shown = redact(url)
    scheme = url.split(":", 1)[0].split("+", 1)[0] if "://" in url else ""
    if must_exist and scheme == "sqlite":
        path = url.split(":///", 1)[1] if ":///" in url else ""
        if path and path != ":memory:" and not Path(path).is_file():
            raise ConfigError(f"storage: no database at {path!r} ({shown}); run a search first "
                              "or give --storage")
    try:
        if scheme in {"sqlite", "postgresql", "mysql"}:
            warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(
                url,
                heartbeat_interval=HEARTBEAT,
                grace_period=GRACE,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
                    max_retry=2
                ),
            )
        return optuna.storages.get_storage(url)
    except Exception as exc:
        reason = redact(one_line(str(getattr(exc, "orig", None) or exc)))
        if len(reason) > 200:
            reason = reason[:197] + "..."
        raise ConfigError(f"storage: cannot open {shown}: {reason}; check the URL, that the "
                          "server is reachable and its driver installed (e.g. "
                          "sqlite:///autometa.db)") from None


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
    storage = open_storage(config.storage)
    name = config.study
    try:
        study = optuna.load_study(study_name=name, storage=storage, sampler=sampler,
                                  pruner=pruner)
    except KeyError:
        study = None
    if study is not None:
        stored = study.user_attrs.get(CONFIG_ATTR)
        if stored is None:
            raise ConfigError(f"study {name!r} in {redact(config.storage)} was not made by "
                              "autometa; choose another study name")
        if stored["fingerprint"] != _jsonable(config.fingerprint()):
            diff = _diff(stored["fingerprint"], _jsonable(config.fingerprint()))
            raise ConfigError(
                f"study {name!r} in {redact(config.storage)} was run with other settings "
                f"({diff}); "
                "use the original settings to resume it, or a new study name"
            )
        if "spaces" in stored:
            _use_stored_spaces(prepared, stored["spaces"], name)
        log.info("resuming study %r (%d trials so far)", name, len(study.trials))
        return study
    study = optuna.create_study(storage=storage, study_name=name, sampler=sampler,
                                pruner=pruner, direction=prepared.task.metric.direction)
    artifacts = (Path(config.artifacts) / name).resolve()
    study.set_user_attr(CONFIG_ATTR, {
        "autometa_version": __version__,
        "config": _jsonable(config.to_dict()),
        "fingerprint": _jsonable(config.fingerprint()),
        "artifacts_path": str(artifacts),
        "task": prepared.task.describe(),
        # The plugins and spaces this search resolved: a resume uses exactly these, so a
        # plugin installed or upgraded since cannot change the space Optuna samples from.
        "spaces": {"algorithm": {n: to_json(s) for n, s in prepared.algorithms.items()},
                   "source": {n: to_json(s) for n, s in prepared.sources.items()}},
    })
    return study


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


def counts(trial: FrozenTrial) -> bool:
    """Trials that use up budget: finished ones, except crashed trials that are retried."""
    if trial.state in (TrialState.COMPLETE, TrialState.PRUNED):
        return True
    return trial.state == TrialState.FAIL and "failure" in trial.user_attrs
