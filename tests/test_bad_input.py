"""Bad input is refused in one line, with exit code 2, and changes nothing (issue 9).

Every case of tests/bad_input_cases.py runs against a copy of a storage that already holds
a study, and must give: exit code 2; exactly one non-empty stderr line, starting with
``autometa: error:`` and naming the problem, without a traceback; the storage file
byte-for-byte unchanged (so no study was added either); no new file anywhere in the case's
directory (no report, no artifact, no ``autometa.db``); and never the side effect of a
malicious pickle. Most cases call ``autometa.cli.main`` in-process; the others run the real
console script, to see what it prints beside the error (argparse usage, library warnings)
and that hostile files cannot make it hang.
"""

from __future__ import annotations

import hashlib
import os
import resource
import shutil
import subprocess
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

import pytest
from bad_input_cases import BASE_STUDY, CASES, MARKER, Case, run_argv
from limits import CLI_SEARCH

from autometa.cli import main

#: Address-space cap of a console-script case, so an expanding YAML bomb cannot exhaust the
#: machine's memory (torch, optuna and pandas import within 3 GiB).
MEMORY_LIMIT = 4 << 30
#: SQLite's own transient files beside the storage.
SQLITE_SIDE_FILES = ("-journal", "-wal", "-shm")


@pytest.fixture(scope="module")
def base_storage(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A storage holding one finished study, made once with a real tiny search."""
    d = tmp_path_factory.mktemp("base")
    assert main(run_argv(d, study=BASE_STUDY)) == 0
    return d / "s.db"


def run_cli(argv: list[str], cwd: Path, *, capsys: pytest.CaptureFixture[str] | None = None
            ) -> tuple[int | None, list[str]]:
    """Run ``autometa argv``: in-process when ``capsys`` is given, else the console script.

    Returns the exit code (None if it timed out) and the non-empty lines of stderr; an
    exception escaping ``main`` counts as a traceback on stderr.
    """
    if capsys is not None:
        escaped = ""
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse
            code = exc.code if isinstance(exc.code, int) else 1
        except Exception:
            code, escaped = 1, traceback.format_exc()
        return code, _lines(capsys.readouterr().err + escaped)
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTOMETA_")}
    env.update(COLUMNS="200", OMP_NUM_THREADS="1")
    try:
        done = subprocess.run([sys.executable, "-m", "autometa.cli", *argv], cwd=cwd, env=env,
                              capture_output=True, text=True, timeout=CLI_SEARCH,
                              preexec_fn=_limit_memory)
    except subprocess.TimeoutExpired as exc:
        err = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else ""
        return None, [f"<timed out after {CLI_SEARCH} s: a hang>", *_lines(err)]
    return done.returncode, _lines(done.stderr)


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def files_in(d: Path) -> set[str]:
    """Every regular file under ``d`` (relative paths), SQLite's transient files aside."""
    return {p.relative_to(d).as_posix() for p in d.rglob("*")
            if p.is_file() and not p.name.endswith(SQLITE_SIDE_FILES)}


def error_problems(code: int | None, lines: list[str], words: tuple[str, ...],
                   forbidden: tuple[str, ...] = ()) -> list[str]:
    """What is wrong with this exit code and stderr for a refused input (empty: nothing)."""
    problems = []
    if code != 2:
        problems.append(f"exit code {code}, expected 2")
    if len(lines) != 1:
        problems.append(f"{len(lines)} stderr lines, expected 1")
    text = "\n".join(lines)
    if lines and not lines[0].startswith("autometa: error:"):
        problems.append("first line does not start with 'autometa: error:'")
    if "Traceback" in text:
        problems.append("a traceback")
    if lines and not any(w.lower() in lines[0].lower() for w in words):
        problems.append(f"the line names none of {list(words)}")
    problems += [f"stderr contains {w!r}" for w in forbidden if w.lower() in text.lower()]
    if problems:
        shown = lines[:3] + ([f"... {len(lines) - 3} more lines"] if len(lines) > 3 else [])
        problems.append("stderr: " + " | ".join(line[:300] for line in shown))
    return problems


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_bad_input_is_refused_in_one_line_and_changes_nothing(
    case: Case, base_storage: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)  # default paths (autometa.db, reports) land here
    storage = tmp_path / "s.db"
    if case.storage:
        shutil.copy(base_storage, storage)
    if case.setup is not None:
        case.setup(tmp_path)
    before, files_before = (sha256(storage) if case.storage else None), files_in(tmp_path)

    code, lines = run_cli(case.argv(tmp_path), tmp_path,
                          capsys=None if case.subprocess else capsys)

    problems = error_problems(code, lines, case.words, case.forbidden)
    if (tmp_path / MARKER).exists():
        problems.insert(0, "the malicious checkpoint's pickle payload RAN")
    if case.storage and sha256(storage) != before:
        problems.append("the storage file changed")
    new = sorted(files_in(tmp_path) - files_before - {MARKER})
    if new:
        problems.append(f"new files: {new[:5]}")
    assert not problems, "; ".join(problems)


# -- a folder of images with a special file in it: must not hang ------------------------------
def image_folder(d: Path) -> Path:
    """Two classes of ten 8x8 PNGs each: enough for episodes='split'."""
    from PIL import Image

    root = d / "images"
    for c, name in enumerate(("cat", "dog")):
        (root / name).mkdir(parents=True)
        for i in range(10):
            Image.new("L", (8, 8), color=40 * c + 5 * i).save(root / name / f"{i}.png")
    return root


def fifo(path: Path) -> None:
    os.mkfifo(path)  # opening it for reading blocks until a writer comes: none will


def symlink_to_itself(path: Path) -> None:
    os.symlink(path.name, path)  # resolving it loops (ELOOP)


@pytest.mark.parametrize("name, make", [("pipe.png", fifo), ("loop.png", symlink_to_itself)],
                         ids=["image-folder-fifo", "image-folder-symlink-loop"])
def test_image_folder_with_a_special_file_does_not_hang(
    name: str, make: Callable[[Path], None], base_storage: Path, tmp_path: Path,
) -> None:
    """Either the search skips the file and succeeds, or it is refused in one line naming
    it, before anything is stored; in both cases without hanging (limits.CLI_SEARCH)."""
    shutil.copy(base_storage, tmp_path / "s.db")
    before = sha256(tmp_path / "s.db")
    root = image_folder(tmp_path)
    make(root / "cat" / name)
    argv = run_argv(tmp_path) + ["--task", "image-folder", "--task-param", f"path={root}",
                                 "--task-param", "episodes=split", "--task-param", "size=8"]

    code, lines = run_cli(argv, tmp_path)

    assert code in (0, 2), f"exit code {code}: {' | '.join(lines[:3])}"
    if code == 2:
        problems = error_problems(code, lines, (name,))
        if sha256(tmp_path / "s.db") != before:
            problems.append("the storage file changed")
        assert not problems, "; ".join(problems)
