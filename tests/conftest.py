"""Shared fixtures: every test runs in its own empty working directory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

#: Task parameters that keep sinusoid evaluation cheap in tests.
SMALL_SINUSOID = {"val_episodes": 20, "test_episodes": 40, "eval_queries": 20}


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run in tmp_path (the default storage autometa.db lands there) with no plugin env vars."""
    monkeypatch.chdir(tmp_path)
    for var in ("AUTOMETA_STRICT_PLUGINS", "AUTOMETA_DISABLE_PLUGINS"):
        monkeypatch.delenv(var, raising=False)
    os.environ.setdefault("COLUMNS", "200")
