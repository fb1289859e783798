"""New images for a built meta-album task (:meth:`MetaAlbum.read_inputs`, used by
``autometa predict`` and ``Predictor.adapt``/``predict`` given a path).

Inputs (``--input``) are an image file, or a folder of them (searched recursively; hidden
files and folders skipped). A support set (``--support``) is one dataset in Meta-Album's
format (``labels.csv`` + ``images/``, :func:`~autometa_plugins.meta_album.reader.read_domain`),
its categories the labels. Images are decoded as the task decoded its own: at its size
and channels, by its resize policy, pixels in [0, 1].
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from autometa import DataError
from autometa.images import decode_file
from autometa.task import InputBatch
from autometa_plugins.meta_album.reader import FORMAT_HINT, LABELS, NAME, read_domain

#: File suffixes read as images from a folder of inputs (case-insensitive).
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff",
                            ".webp", ".ppm", ".pgm", ".pbm"})


class Decoding(Protocol):
    """What reading new images needs of a built
    :class:`~autometa_plugins.meta_album.task.MetaAlbum` (a protocol: the task imports this
    module, never the other way round)."""

    input_shape: tuple[int, ...]  # (channels, size, size)
    resize: str  # the task's resize policy


def read_images(task: Decoding, path: Path, *, labelled: bool) -> InputBatch:
    """The images at ``path`` decoded for ``task`` (see the module docstring).

    Raises:
        DataError: a support path that is not a Meta-Album dataset, a folder without
            images, an image that cannot be decoded.
    """
    labels: list[Any] | None = None
    if labelled:
        if not (path.is_dir() and (path / LABELS).is_file()):
            raise DataError(f"--support {str(path)!r} is not a Meta-Album dataset; give one "
                            f"dataset folder: {FORMAT_HINT}")
        domain = read_domain(path.parent, path.name)
        files = [f for per_class in domain.files for f in per_class]
        labels = [c for c, per_class in zip(domain.classes, domain.files, strict=True)
                  for _ in per_class]
    elif path.is_dir():
        files = sorted(f for f in path.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES
                       and f.is_file() and not any(p.startswith(".") for p in
                                                   f.relative_to(path).parts))
        if not files:
            raise DataError(f"--input {str(path)!r} holds no images "
                            f"({', '.join(sorted(IMAGE_SUFFIXES))}); give image files")
    else:
        files = [path]
    channels, size = task.input_shape[0], task.input_shape[-1]
    pixels = np.empty((len(files), size, size, channels), dtype=np.uint8)  # (n, H, W, C)
    for i, file in enumerate(files):
        try:
            image, _ = decode_file(file, size=size, channels=channels, resize=task.resize)
        except DataError as exc:
            raise DataError(f"{NAME}: {exc}") from exc.__cause__
        pixels[i] = image.reshape(size, size, channels)
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div_(255)  # (n, C, H, W)
    ids = [f.relative_to(path).as_posix() if path.is_dir() else f.name for f in files]
    return InputBatch(x.contiguous(), labels, ids, "file")
