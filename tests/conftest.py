"""Shared fixtures: every test runs in its own empty working directory."""

from __future__ import annotations

import os
from collections.abc import Iterator
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


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny models run far faster (and steadier) on one thread of a busy 2-core machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
