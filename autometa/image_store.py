"""One decoded-image store per dataset: uint8 pixels in a memory-mapped file, built once.

A dataset's images are decoded once, at the task's size, channels and resize policy, into
``<cache>/stores/<name>.u8`` (uint8, (n, C, H, W), C-contiguous) with a JSON manifest
beside it (:mod:`autometa.cache` says where the cache is). Every later run, and every
worker process on the machine, maps the same file read-only: the pages sit once in the
page cache, whatever the number of workers, and a trial gathers only the images of its
episodes (:class:`StoredImages`), converting them to float on its own device. This is
the layout of numpy memmaps as FFCV and WebDataset use them: decode once, share pages,
gather indices.

The store's name is keyed by its content (:meth:`ImageSource.key`: every file's path, size
and modification time, or a hash of an array's bytes) and by everything that shapes the
pixels (size, channels, resize policy, the store format's version). So:

* a folder that changed since a store was built gets a new store; the older store of the
  same data (same ``slot``: the same folder at the same settings) is deleted once the new
  one is complete, and a process still reading it keeps its pages;
* one process builds, under an exclusive ``flock`` on ``<name>.lock``; others wait on the
  lock and then open what it built;
* a store counts as built only when its manifest is written last (after the pixels are
  complete and renamed into place), and it is checked on every open: format version, key,
  file size and a checksum of 64 blocks spread over the file. A partial, truncated or
  altered store is rebuilt;
* files that change while the store is built are detected (the key is read again at the
  end) and the new store is discarded: the pixels of two versions are never mixed;
* a disk that fills while the store is built: the partial file is removed and the error
  names the space needed.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import multiprocessing
import os
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from autometa import cache, work
from autometa.errors import DataError
from autometa.images import RESIZE_POLICIES, decode_file, decode_image

__all__ = ["ArrayImages", "FileImages", "ImageSource", "ImageStore", "StoredImages",
           "open_store"]

log = logging.getLogger(__name__)

#: Bumped whenever the pixels of a store would differ for the same inputs.
FORMAT = 1
#: Images decoded and written at a time.
CHUNK = 256


class ImageSource(Protocol):
    """Images to decode into a store, in their order (the store's index ``i``)."""

    def __len__(self) -> int: ...

    def key(self) -> dict[str, Any]:
        """JSON facts that change whenever any image's content may have changed."""

    def slot(self) -> str:
        """Where these images come from (a folder), whatever their content: a newer store
        of the same slot and settings replaces an older one."""

    def decode(self, i: int, size: int, channels: int | str,
               resize: str) -> tuple[np.ndarray, bool]:
        """Image ``i`` by :func:`autometa.images.decode_image`, and whether it was square.

        Raises:
            DataError: the image cannot be read (naming it and the fix).
        """


class FileImages:
    """Image files; keyed by every file's absolute path, size and modification time."""

    def __init__(self, files: Sequence[Path], *, slot: str) -> None:
        self.files = list(files)
        self._slot = slot

    def __len__(self) -> int:
        return len(self.files)

    def key(self) -> dict[str, Any]:
        hasher = hashlib.sha256()
        for file in self.files:
            try:
                st = file.stat()
            except OSError as exc:
                raise DataError(f"cannot read image {str(file)!r} ({exc.strerror}); the "
                                "folder changed while it was read: run again") from None
            hasher.update(f"{os.path.abspath(file)}\0{st.st_size}\0{st.st_mtime_ns}\n"
                          .encode())
        return {"files": len(self.files), "stat": hasher.hexdigest()}

    def slot(self) -> str:
        return self._slot

    def decode(self, i: int, size: int, channels: int | str,
               resize: str) -> tuple[np.ndarray, bool]:
        return decode_file(self.files[i], size=size, channels=channels, resize=resize)


class ArrayImages:
    """Images already in memory as uint8 (n, H, W) or (n, H, W, 3) (CIFAR's pickles);
    keyed by the given facts (e.g. the files they were read from, with sizes and times)."""

    def __init__(self, pixels: np.ndarray, *, facts: dict[str, Any], slot: str) -> None:
        if pixels.dtype != np.uint8 or pixels.ndim not in (3, 4):
            raise ValueError(f"expected uint8 (n, H, W[, 3]) pixels, got {pixels.dtype} "
                             f"{pixels.shape}")
        self.pixels, self.facts, self._slot = pixels, facts, slot

    def __len__(self) -> int:
        return len(self.pixels)

    def key(self) -> dict[str, Any]:
        return self.facts

    def slot(self) -> str:
        return self._slot

    def decode(self, i: int, size: int, channels: int | str,
               resize: str) -> tuple[np.ndarray, bool]:
        from PIL import Image

        image = Image.fromarray(self.pixels[i])
        return decode_image(image, size=size, channels=channels, resize=resize), \
            image.size[0] == image.size[1]


class ImageStore:
    """A built store, mapped read-only: ``pixels`` uint8 (n, C, H, W).

    Attributes:
        non_square: how many source images were not square (for the resize warning).
    """

    def __init__(self, path: Path, manifest: dict[str, Any]) -> None:
        self.path = path
        self.manifest = manifest
        self.shape: tuple[int, ...] = tuple(manifest["shape"])
        self.non_square = int(manifest["non_square"])
        self.pixels = np.memmap(path, dtype=np.uint8, mode="r", shape=self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def gather(self, index: Tensor, device: torch.device) -> Tensor:
        """Images ``index`` (any shape, int64, any device) as float32 in [0, 1] on
        ``device``: (*index.shape, C, H, W).

        Only the gathered uint8 pixels are copied from the mapped file; on CUDA they go
        through pinned memory with a non-blocking copy, and become float on the device.
        """
        flat = index.reshape(-1).cpu().numpy()
        batch = torch.from_numpy(self.pixels[flat])  # uint8 (k, C, H, W): a copy
        if device.type == "cuda":
            batch = batch.pin_memory().to(device, non_blocking=True)
        else:
            batch = batch.to(device)
        return batch.float().div_(255).reshape(*index.shape, *self.shape[1:])


class StoredImages:
    """A store's images on one device, as a :class:`~autometa.episodes.ClassPool` gathers
    them (``shape`` and ``gather``, like a tensor's indexing)."""

    def __init__(self, store: ImageStore, device: torch.device | str) -> None:
        self.store, self._device = store, torch.device(device)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.store.shape

    @property
    def device(self) -> torch.device:
        return self._device

    def __len__(self) -> int:
        return len(self.store)

    def gather(self, index: Tensor) -> Tensor:
        return self.store.gather(index, self.device)


def open_store(source: ImageSource, *, name: str, size: int, channels: int | str,
               resize: str = "stretch", cache_dir: str | os.PathLike[str] | None = None
               ) -> ImageStore:
    """The store of ``source`` at these settings: opened if built, else built now.

    Building reports progress through :func:`autometa.work.report` (the CLI's bar).

    Args:
        name: the dataset, in file names and messages (e.g. "image-folder").
        size, channels, resize: as :func:`autometa.images.decode_image` takes them;
            ``channels="auto"`` stores 1 channel if every image is grayscale, else 3.
        cache_dir: the ``cache_dir`` setting (None: see :func:`autometa.cache.cache_dir`).

    Raises:
        ConfigError: the cache directory is not writable.
        DataError: an image cannot be read; the disk filled; the images changed while the
            store was built. Nothing is left behind in the cache.
    """
    if resize not in RESIZE_POLICIES:
        raise DataError(f"{name}: resize {resize!r} is not one of {list(RESIZE_POLICIES)}")
    folder = cache.writable(cache.cache_dir(cache_dir))
    settings = {"format": FORMAT, "size": size, "channels": channels, "resize": resize}
    content = _digest({"key": source.key(), **settings})
    slot = _digest({"slot": source.slot(), **settings})[:10]
    stem = f"{re.sub(r'[^A-Za-z0-9_.-]+', '-', name)}-{slot}-{content[:16]}"
    waiting = (f"{name}: another process is building this dataset's store; waiting for it "
               f"({folder / stem}.u8)")
    with cache.locked(folder / f"{stem}.lock", waiting):
        manifest = _valid(folder, stem, content)
        if manifest is None:
            manifest = _build(source, folder, stem, content, name, size, channels, resize)
            _drop_older(folder, stem)
    store = ImageStore(folder / f"{stem}.u8", manifest)
    # Once per search: a pool's worker processes (children) open the same store silently.
    if store.non_square and resize == "stretch" and multiprocessing.parent_process() is None:
        log.warning("%s: %d of %d images are not square and were stretched to %dx%d; set "
                    "resize='center-crop' or 'pad' to keep their aspect ratio", name,
                    store.non_square, len(store), size, size)
    return store


def _digest(facts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()


def _valid(folder: Path, stem: str, content: str) -> dict[str, Any] | None:
    """The manifest of a complete, unaltered store ``stem``; None (and its files removed)
    if it is missing, partial, truncated or altered."""
    data, meta = folder / f"{stem}.u8", folder / f"{stem}.json"
    try:
        manifest = json.loads(meta.read_text())
        total = int(np.prod(manifest["shape"]))
        ok = (manifest["format"] == FORMAT and manifest["key"] == content
              and data.stat().st_size == total and cache.checksum(data, total) == manifest["check"])
    except FileNotFoundError:
        ok, manifest = False, None
    except (OSError, ValueError, KeyError, TypeError):
        ok, manifest = False, {}
    if ok:
        return manifest
    if manifest is not None or data.exists():
        log.warning("store %s is partial or corrupt; rebuilding it", data)
    for path in (meta, data):
        path.unlink(missing_ok=True)
    return None


def _build(source: ImageSource, folder: Path, stem: str, content: str, name: str,
           size: int, channels: int | str, resize: str) -> dict[str, Any]:
    n = len(source)
    depth = 1 if channels == 1 else 3  # "auto": 3 while decoding, 1 at the end if all gray
    partial = folder / f"{stem}.u8.partial"
    what = f"{name}: decoding {n} images into the cache"
    gray = True
    non_square = 0

    def decode(i: int) -> tuple[np.ndarray, bool]:
        try:
            return source.decode(i, size, channels, resize)
        except DataError as exc:
            raise DataError(f"{name}: {exc}") from exc.__cause__
    try:
        with open(partial, "wb") as out:
            _reserve(out, n * depth * size * size)
            work.report(what, 0, n)
            with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
                for start in range(0, n, CHUNK):
                    ids = range(start, min(n, start + CHUNK))
                    decoded = list(pool.map(decode, ids))
                    block = np.empty((len(ids), size, size, depth), dtype=np.uint8)
                    for j, (image, square) in enumerate(decoded):
                        non_square += not square
                        if image.ndim == 2:
                            block[j] = image[..., None]
                        else:
                            block[j] = image
                            gray = gray and bool((image[..., 1:] == image[..., :1]).all())
                    out.write(np.ascontiguousarray(block.transpose(0, 3, 1, 2)).data)
                    work.report(what, ids.stop, n)
            out.flush()
            os.fsync(out.fileno())
        if channels == "auto" and gray and depth == 3:  # every image gray: keep 1 channel
            _keep_first_channel(partial, n, size)
            depth = 1
        if _digest({"key": source.key(), "format": FORMAT, "size": size,
                    "channels": channels, "resize": resize}) != content:
            raise DataError(f"{name}: images changed while the store was built; nothing was "
                            "kept; run again once the folder is complete")
        shape = [n, depth, size, size]
        data = folder / f"{stem}.u8"
        os.replace(partial, data)
        manifest = {"format": FORMAT, "key": content, "dataset": name, "shape": shape,
                    "size": size, "channels": channels, "resize": resize,
                    "non_square": non_square,
                    "check": cache.checksum(data, n * depth * size * size)}
        tmp = folder / f"{stem}.json.partial"
        tmp.write_text(json.dumps(manifest))
        os.replace(tmp, folder / f"{stem}.json")  # written last: the store is complete
        return manifest
    except OSError as exc:
        partial.unlink(missing_ok=True)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            need = n * depth * size * size / 2**30
            raise DataError(
                f"{name}: the disk of the cache directory {str(folder.parent)!r} filled while "
                f"the store was built ({exc.strerror}; it needs {need:.2f} GiB); the partial "
                "store was removed; free space or give another --cache-dir") from None
        raise
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def _reserve(out: Any, nbytes: int) -> None:
    """Allocate the whole file first, so that a full disk fails now, not half-way."""
    if nbytes == 0:
        return
    try:
        os.posix_fallocate(out.fileno(), 0, nbytes)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # file systems without it
            raise


def _keep_first_channel(path: Path, n: int, size: int) -> None:
    """Rewrite an (n, 3, size, size) file whose channels are equal as (n, 1, size, size)."""
    full = np.memmap(path, dtype=np.uint8, mode="r", shape=(n, 3, size, size))
    tmp = path.with_suffix(".gray")
    try:
        with open(tmp, "wb") as out:
            for start in range(0, n, CHUNK * 16):
                out.write(np.ascontiguousarray(full[start:start + CHUNK * 16, :1]).data)
        del full
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _drop_older(folder: Path, stem: str) -> None:
    """Delete the other stores of the same slot (older builds of changed data)."""
    prefix = stem.rsplit("-", 1)[0] + "-"
    for path in folder.iterdir():
        if path.name.startswith(prefix) and not path.name.startswith(stem):
            path.unlink(missing_ok=True)
