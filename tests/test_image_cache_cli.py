"""What a user of an image task sees of the decoded-image store: one progress report
while it is built, none when it is reused, `autometa cache`, and a cache directory that
cannot be used refused before anything is stored."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from limits import CLI_SEARCH, QUICK_SUBPROCESS
from PIL import Image

SEARCH = ["run", "--task", "image-folder", "--task-param", "size=12",
          "--task-param", "ways=2", "--task-param", "queries=2",
          "--task-param", "val_episodes=4", "--task-param", "test_episodes=4",
          "--algorithms", "protonet", "--sources", "conv4", "--trials", "1",
          "--meta-steps", "2", "--eval-every", "2", "--no-progress"]


def autometa_cli(*args: str, cwd: Path, timeout: int = CLI_SEARCH
                 ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "autometa", *args], cwd=cwd,
                          env={**os.environ, "COLUMNS": "200"}, capture_output=True,
                          text=True, timeout=timeout)


def make_folder(root: Path, classes: int = 8, per_class: int = 5) -> Path:
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(
                root / f"class{c}" / f"{i}.png")
    return root


def test_the_store_is_built_once_with_progress_then_reused(tmp_path: Path) -> None:
    make_folder(tmp_path / "data")
    cache = tmp_path / "my-cache"
    args = [*SEARCH, "--task-param", "path=data", "--cache-dir", str(cache)]
    first = autometa_cli(*args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert "image-folder: decoding 40 images into the cache: 0/40" in first.stdout
    assert "image-folder: decoding 40 images into the cache: 40/40" in first.stdout
    second = autometa_cli(*args, "--trials", "2", cwd=tmp_path)  # resumes: one trial more
    assert second.returncode == 0, second.stderr
    assert "decoding" not in second.stdout  # the store is reused
    # The results commands rebuild the task from the same store (--cache-dir), so the
    # default cache directory ($AUTOMETA_CACHE_DIR here) stays empty.
    board = autometa_cli("leaderboard", "image-folder-seed0", "--cache-dir", str(cache),
                         cwd=tmp_path)
    assert board.returncode == 0, board.stderr
    default = Path(os.environ["AUTOMETA_CACHE_DIR"])
    assert not (default / "stores").exists() or not list((default / "stores").iterdir())
    listed = autometa_cli("cache", "--cache-dir", str(cache), cwd=tmp_path,
                          timeout=QUICK_SUBPROCESS)
    assert listed.returncode == 0 and "image-folder  40x3x12x12  stretch" in listed.stdout
    cleared = autometa_cli("cache", "clear", "--cache-dir", str(cache), cwd=tmp_path,
                           timeout=QUICK_SUBPROCESS)
    assert cleared.returncode == 0 and cleared.stdout.startswith("removed 1 store(s)")
    assert "0 store(s)" in autometa_cli("cache", "--cache-dir", str(cache), cwd=tmp_path,
                                        timeout=QUICK_SUBPROCESS).stdout


def test_an_unwritable_cache_directory_stops_before_anything_is_stored(tmp_path: Path
                                                                      ) -> None:
    make_folder(tmp_path / "data")
    (tmp_path / "not-a-dir").write_text("")
    done = autometa_cli(*SEARCH, "--task-param", "path=data", "--cache-dir",
                        "not-a-dir/cache", cwd=tmp_path)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "cache directory 'not-a-dir/cache' is not writable" in lines[0]
    assert "--cache-dir" in lines[0]
    assert not (tmp_path / "autometa.db").exists()
