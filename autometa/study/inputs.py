"""Input files of a search (a CSV, an image folder, a checkpoint): found by their declared
type, resolved against the data root, and identified by content.

A plugin setting declared as a path (``path: str | os.PathLike[str] | None``, see
:func:`autometa.params.is_path`) names an input file or directory. Relative paths resolve
against ``data_root`` (default: the working directory), and the study stores each one's
SHA-256 as the search created it. A process that joins the study (``autometa worker`` on
another machine, or a resumed ``autometa run``) hashes its own copy and refuses to run if
it differs or is missing, naming the file, before anything runs: every trial of one study
sees the same data.

Every process of a search hashes its inputs, so that a folder of 60,000 images is not read
again by each: with a ``memo`` directory (the cache directory), a file whose size and
modification time (ns) are those it had when hashed is not read again (the rule of make
and rsync); the memo is one JSON file per input under ``<memo>/digests``.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from autometa.errors import ConfigError
from autometa.params import declared_types, is_path

#: Bytes read at a time while hashing.
CHUNK = 1 << 20


def root_of(data_root: str | None) -> Path:
    """The directory relative input paths resolve against."""
    return Path(data_root) if data_root is not None else Path.cwd()


def resolve(given: str | os.PathLike[str], root: Path) -> Path:
    """Where input ``given`` is: ``~`` expanded, a relative path under ``root``."""
    path = Path(given).expanduser()
    return path if path.is_absolute() else root / path


def localize(cls: Any, params: Mapping[str, Any], root: Path | None) -> dict[str, Any]:
    """``params`` with every relative path-typed value made ``root / value``; unchanged for
    ``root=None`` (relative to the working directory, as the user wrote them)."""
    if root is None:
        return dict(params)
    types = declared_types(cls)
    out = dict(params)
    for name, value in params.items():
        if _names_file(types.get(name), value):
            out[name] = str(resolve(value, root))
    return out


def path_settings(cls: Any, params: Mapping[str, Any], prefix: str) -> dict[str, str]:
    """``{"<prefix>.<name>": path as given}`` for ``params`` that name input files."""
    types = declared_types(cls)
    return {f"{prefix}.{name}": os.fspath(value) for name, value in params.items()
            if _names_file(types.get(name), value)}


def _names_file(declared: Any, value: Any) -> bool:
    return declared is not None and is_path(declared) \
        and isinstance(value, str | os.PathLike) and os.fspath(value) != ""


def digest(path: Path, memo: Path | None = None) -> str | None:
    """SHA-256 of a file, or of a directory's regular files (their relative paths and
    contents, in sorted order); None if ``path`` does not exist.

    Args:
        memo: a directory remembering each file's hash with its size and modification
            time (see the module docstring); None: read every file.
    """
    if not (path.is_file() or path.is_dir()):
        return None
    known = _Memo(memo, path)
    if path.is_file():
        sha = known.file(path, ".")
    else:
        total = hashlib.sha256()
        for file in sorted(_regular_files(path)):
            name = file.relative_to(path).as_posix()
            total.update(name.encode() + b"\0")
            total.update(bytes.fromhex(known.file(file, name)))
        sha = total.hexdigest()
    known.save()
    return sha


class _Memo:
    """The remembered hashes of one input's files: {name: [size, mtime_ns, sha256]}."""

    def __init__(self, memo: Path | None, path: Path) -> None:
        self.file_path: Path | None = None
        self.entries: dict[str, list[Any]] = {}
        self.seen: dict[str, list[Any]] = {}
        if memo is not None:
            key = hashlib.sha256(os.path.abspath(path).encode()).hexdigest()[:24]
            self.file_path = memo / "digests" / f"{key}.json"
            try:
                self.entries = json.loads(self.file_path.read_text())
            except (OSError, ValueError):
                self.entries = {}

    def file(self, file: Path, name: str) -> str:
        st = file.stat()
        known = self.entries.get(name) if isinstance(self.entries, dict) else None
        if isinstance(known, list) and known[:2] == [st.st_size, st.st_mtime_ns]:
            sha = str(known[2])
        else:
            sha = _file_digest(file)
        self.seen[name] = [st.st_size, st.st_mtime_ns, sha]
        return sha

    def save(self) -> None:
        """Write the memo if it changed; a memo that cannot be written is skipped."""
        if self.file_path is None or self.seen == self.entries:
            return
        try:
            self.file_path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile("w", dir=self.file_path.parent, delete=False,
                                             suffix=".partial") as out:
                json.dump(self.seen, out)
            os.replace(out.name, self.file_path)
        except OSError:
            pass


def _file_digest(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            sha.update(chunk)
    return sha.hexdigest()


def _regular_files(directory: Path) -> list[Path]:
    """Regular files under ``directory``, following links once (never a loop), skipping
    FIFOs, sockets and devices as the image-folder scan does."""
    out: list[Path] = []
    seen: set[str] = set()
    for current, dirs, files in os.walk(directory, followlinks=True):
        real = os.path.realpath(current)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs.sort()
        out += [Path(current) / f for f in files if (Path(current) / f).is_file()]
    return out


def fingerprints(paths: Mapping[str, str], root: Path, memo: Path | None = None
                 ) -> dict[str, dict[str, str]]:
    """``{setting: {"path": as given, "sha256": ...}}`` for the inputs that exist (a
    missing one is left to the plugin, whose error names what it expected); ``memo``: see
    :func:`digest`."""
    out = {}
    for key, given in paths.items():
        sha = digest(resolve(given, root), memo)
        if sha is not None:
            out[key] = {"path": given, "sha256": sha}
    return out


def check_same(stored: Mapping[str, Mapping[str, str]],
               current: Mapping[str, Mapping[str, str]], paths: Mapping[str, str], root: Path,
               study: str) -> None:
    """Refuse to join ``study`` unless this machine's copy of each input among ``paths``
    has the hash ``study`` stored.

    Args:
        stored: the study's fingerprints (:func:`fingerprints` when it was created).
        current: this machine's fingerprints of ``paths``.

    Raises:
        ConfigError: one line naming the setting, the file and the fix.
    """
    for key, given in paths.items():
        if key not in stored:
            continue
        where = resolve(given, root)
        if key not in current:
            raise ConfigError(f"{key}: input {given!r} of study {study!r} is not at "
                              f"{str(where)!r} on this machine; copy it there, or give "
                              "--data-root DIR (the folder relative paths are under)")
        mine, theirs = current[key]["sha256"], stored[key]["sha256"]
        if mine != theirs:
            raise ConfigError(f"{key}: {str(where)!r} differs from the file study {study!r} "
                              f"was created with (sha256 {mine[:12]}... here, {theirs[:12]}... "
                              "in the study); copy the same file to this machine")
