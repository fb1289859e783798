"""The cache directory: where decoded-image stores and frozen features live, what it holds,
how to clear it; the lock and checksum its builders share.

The directory is, first found: the ``cache_dir`` setting (``--cache-dir``), the
``AUTOMETA_CACHE_DIR`` environment variable, ``$XDG_CACHE_HOME/autometa``, then
``~/.cache/autometa``. It is this machine's, like ``storage``: never stored in a study.
Everything in it can be rebuilt from the data, so deleting it (``autometa cache clear``)
only costs the next run the time to decode its images (:mod:`autometa.image_store`) and
embed them with a frozen network (:mod:`autometa.feature_store`) again.

Importing this module imports neither torch nor numpy (``autometa cache`` stays fast).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from autometa.errors import ConfigError

#: The public names (plugins may use them: a build under a lock, as ``pretrained`` does);
#: the rest serve ``autometa cache`` and the engine.
__all__ = ["cache_dir", "locked"]

log = logging.getLogger(__name__)

#: The environment variable that sets the cache directory (below ``--cache-dir``).
ENV = "AUTOMETA_CACHE_DIR"
#: Stores sit in this sub-folder, one ``<name>.json`` manifest beside each data file
#: (``<name>.u8`` decoded images; ``<name>.f32`` frozen features: the manifest's ``data``).
STORES = "stores"
#: Remembered hashes of input files (:mod:`autometa.study.inputs`).
DIGESTS = "digests"
#: Blocks read for the checksum that detects an altered store.
CHECK_BLOCKS, BLOCK = 64, 1 << 16


def cache_dir(setting: str | os.PathLike[str] | None = None) -> Path:
    """The cache directory (see the module docstring); not created here."""
    if setting is not None and str(setting):
        return Path(setting).expanduser()
    if os.environ.get(ENV):
        return Path(os.environ[ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "autometa"


def writable(root: Path) -> Path:
    """``root/stores``, created if needed and checked by writing a file in it.

    Raises:
        ConfigError: the directory cannot be created or written (one line, with the fix).
    """
    folder = root / STORES
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".probe-"):
            pass
    except OSError as exc:
        why = "read-only file system" if exc.errno == errno.EROFS else \
            exc.strerror or type(exc).__name__
        raise ConfigError(
            f"cache directory {str(root)!r} is not writable ({why}); give a writable one "
            f"with --cache-dir DIR (or cache_dir in a config file, or ${ENV})") from None
    return folder


@contextmanager
def locked(path: Path, waiting: str) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` (created if missing; released if the process
    dies); ``waiting`` is logged once as a warning when another process holds it (the
    builder of the same store, or of the same pre-trained backbone), then this one waits.

    Raises:
        OSError: ``path`` cannot be opened for appending (a read-only folder).
    """
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.warning("%s", waiting)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def checksum(path: Path, total: int) -> str:
    """blake2b of :data:`CHECK_BLOCKS` blocks spread evenly over the file, and its size
    (``total`` bytes): cheap, and catches a truncated or overwritten store."""
    hasher = hashlib.blake2b(str(total).encode(), digest_size=16)
    with open(path, "rb") as handle:
        for k in range(CHECK_BLOCKS):
            handle.seek(max(0, (total - BLOCK) * k // max(1, CHECK_BLOCKS - 1)))
            hasher.update(handle.read(BLOCK))
    return hasher.hexdigest()


@dataclass(frozen=True)
class CachedStore:
    """One store in the cache: its files and what its manifest says it holds."""

    name: str  # file stem: <dataset>-<slot>-<content>, or features-<source>-<slot>-<key>
    dataset: str  # the task that built it, e.g. "image-folder"; "features of <source>"
    shape: tuple[int, ...]  # (images, channels, height, width); features: (examples, d)
    resize: str  # the resize policy its images were decoded with ("-" for features)
    bytes: int  # on disk, manifest included
    complete: bool  # False: a partial or corrupt store (a build was interrupted)
    files: tuple[Path, ...]


def stores(root: Path) -> list[CachedStore]:
    """The stores under ``root`` (see :func:`cache_dir`), sorted by name; none if absent."""
    import json

    folder = root / STORES
    if not folder.is_dir():
        return []
    groups: dict[str, list[Path]] = {}
    for path in folder.iterdir():
        if path.name.startswith(".probe-"):
            continue
        stem = path.name.split(".", 1)[0]
        groups.setdefault(stem, []).append(path)
    out = []
    for stem, files in sorted(groups.items()):
        manifest: dict[str, object] = {}
        try:
            manifest = json.loads((folder / f"{stem}.json").read_text())
        except (OSError, ValueError):
            pass
        shape = tuple(int(s) for s in manifest.get("shape", ()))  # type: ignore[attr-defined]
        data = folder / str(manifest.get("data", f"{stem}.u8"))
        expected = int(manifest.get("itemsize", 1))  # type: ignore[call-overload]
        for s in shape:
            expected *= s
        complete = bool(shape) and data.is_file() and data.stat().st_size == expected
        size = sum(f.stat().st_size for f in files if f.is_file())
        out.append(CachedStore(stem, str(manifest.get("dataset", "?")), shape,
                               str(manifest.get("resize", "?")), size, complete,
                               tuple(sorted(files))))
    return out


def clear(root: Path) -> tuple[int, int]:
    """Delete every store and remembered hash under ``root``; returns (stores, bytes)
    removed.

    A process that has a store open keeps reading it (the files are unlinked, not
    overwritten); the next run rebuilds what it needs.
    """
    listed = stores(root)
    freed = sum(s.bytes for s in listed)
    for sub in (STORES, DIGESTS):
        folder = root / sub
        if folder.is_dir():
            freed += 0 if sub == STORES else sum(
                f.stat().st_size for f in folder.iterdir() if f.is_file())
            shutil.rmtree(folder)
    return len(listed), freed
