"""New images for a built benchmark task (:meth:`BenchmarkTask.read_inputs`, used by
``autometa predict``), decoded exactly as the task decoded its own: its size, channels and
resize policy, pixels in [0, 1].

Inputs are image files, or a folder of them (searched recursively, hidden entries
skipped); a support set is a folder with one sub-folder of images per class (the class
name is the folder's). Messages name the ``autometa predict`` option the path came with.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from autometa import DataError
from autometa.images import decode_file
from autometa.task import InputBatch
from autometa_plugins.fewshot_datasets.folders import IMAGE_SUFFIXES, class_folders


class Decoding(Protocol):
    """What reading new images needs of a built task (a protocol: the task imports this
    module, never the other way round)."""

    name: str  # the registered name, in messages
    size: int  # the side images are resized to
    resize: str  # the resize policy
    input_shape: tuple[int, ...]  # (channels, size, size)


def read_images(task: Decoding, path: Path, *, labelled: bool) -> InputBatch:
    """The images at ``path`` decoded for ``task`` (see the module docstring).

    Raises:
        DataError: a support path that is a file, a folder without images, an image that
            cannot be decoded.
    """
    flag = "--support" if labelled else "--input"
    labels: list[Any] | None = None
    if labelled:
        if not path.is_dir():
            raise DataError(f"{task.name}: {flag} {str(path)!r} is a file; give a folder "
                            "with one sub-folder of images per class")
        classes = class_folders(path, task.name, f"{flag} <folder>/<class>/<image>")
        files = [f for _, images in classes for f in images]
        labels = [name for name, images in classes for _ in images]
    elif path.is_dir():
        files = sorted(f for f in path.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES
                       and f.is_file() and not any(p.startswith(".") for p in
                                                   f.relative_to(path).parts))
        if not files:
            raise DataError(f"{task.name}: {flag} {str(path)!r} holds no images "
                            f"({', '.join(sorted(IMAGE_SUFFIXES))}); give image files")
    else:
        files = [path]
    channels = task.input_shape[0]
    pixels = np.empty((len(files), *task.input_shape), dtype=np.uint8)  # (n, C, H, W)
    for i, file in enumerate(files):
        try:
            image, _ = decode_file(file, size=task.size, channels=channels, resize=task.resize)
        except DataError as exc:
            raise DataError(f"{task.name}: {flag}: {exc}") from exc.__cause__
        pixels[i] = image[None] if image.ndim == 2 else image.transpose(2, 0, 1)
    x = torch.from_numpy(pixels).float().div_(255)  # (n, C, size, size) in [0, 1]
    ids = [f.relative_to(path).as_posix() if path.is_dir() else f.name for f in files]
    return InputBatch(x, labels, ids, "file")
