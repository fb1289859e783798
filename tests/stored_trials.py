"""A study's trials read from a SQLite file while searches may be writing it, for the tests
that watch real worker processes (tests/test_signals.py, tests/test_launch_slurm.py)."""

from __future__ import annotations

from pathlib import Path

import optuna
from optuna.trial import FrozenTrial

from autometa.study.storage import schema_ready


def stored_trials(db: Path, study: str = "sinusoid-seed0") -> list[FrozenTrial]:
    """Study ``study``'s trials in SQLite file ``db``, read without writing anything (a
    search may be creating the tables: even Optuna's schema check may write its version
    row); none while the file, its tables or the study do not exist yet."""
    url = f"sqlite:///{db}"
    if not db.exists() or not schema_ready(url):
        return []
    storage = optuna.storages.RDBStorage(url, skip_table_creation=True,
                                         skip_compatibility_check=True)
    try:
        return optuna.load_study(study_name=study, storage=storage).trials
    except KeyError:  # no study yet
        return []
