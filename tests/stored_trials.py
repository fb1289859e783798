"""A study's trials read while searches may be writing them, for the tests that watch real
worker processes (tests/test_signals.py, tests/test_postgres.py, tests/test_launch_slurm.py)."""

from __future__ import annotations

from pathlib import Path

import optuna
from optuna.trial import FrozenTrial

from autometa.study.storage import schema_ready


def stored_trials(storage: str | Path, study: str = "sinusoid-seed0") -> list[FrozenTrial]:
    """Study ``study``'s trials in ``storage`` (a URL, or a SQLite file's path), read
    without creating or writing anything (a search may be creating the tables: Optuna's
    storage would stamp its version rows into them, see ``schema_ready``); none while the
    file, its tables or the study do not exist yet."""
    if isinstance(storage, Path):
        if not storage.exists():
            return []
        storage = f"sqlite:///{storage}"
    if not schema_ready(storage):
        return []
    rdb = optuna.storages.RDBStorage(storage, skip_table_creation=True,
                                     skip_compatibility_check=True)
    try:
        return optuna.load_study(study_name=study, storage=rdb).trials
    except KeyError:  # no study yet
        return []
    finally:
        rdb.engine.dispose()
