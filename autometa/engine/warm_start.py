"""Warm start: the earlier studies a new study takes its first configurations from (the
best on meta-val of each), read and checked by ``prepare`` before anything is stored.
:mod:`autometa.engine.initial` queues those that fit the search.
"""

from __future__ import annotations

import logging

import optuna

from autometa.config import SearchConfig, split_study_ref
from autometa.errors import ConfigError, closest, redact
from autometa.study.baselines import searched
from autometa.study.storage import open_storage, schema_ready
from autometa.study.trials import TrialPlan, ranked_trials
from autometa.study.urls import local_file

log = logging.getLogger(__name__)


def read_warm_start(config: SearchConfig) -> list[tuple[str, list[tuple[str, TrialPlan]]]]:
    """``(study, [(origin, plan), ...])`` per study in ``config.warm_start``: the plans of
    its ranked searched trials (baselines left out), best first; only reads.

    Raises:
        ConfigError: a study or its storage does not exist (the closest name suggested).
    """
    out = []
    for entry in config.warm_start:
        name, url = split_study_ref(entry, config.storage)
        file = local_file(url)
        if file is not None and not file.is_file():
            raise ConfigError(f"warm_start: {entry!r}: there is no database file at "
                              f"{str(file)!r}; give the storage that holds study {name!r}")
        storage = open_storage(url, must_exist=True, create_tables=False) \
            if schema_ready(url) else None
        try:
            if storage is None:
                raise KeyError(name)
            study = optuna.load_study(study_name=name, storage=storage)
        except KeyError:
            names = sorted(optuna.get_all_study_names(storage)) if storage else []
            raise ConfigError(f"warm_start: no study {name!r} in {redact(url)}"
                              f"{closest(name, names)}; its studies: "
                              f"{', '.join(names) or 'none'}") from None
        # Its baselines are not taken: this search runs its own.
        best = searched(ranked_trials(study))
        if not best:
            log.warning("warm start: study %r has no complete trial; nothing taken from it",
                        name)
        out.append((name, [(f"warm start from {name} trial {t.number}", TrialPlan.of(t))
                           for t in best]))
    return out
