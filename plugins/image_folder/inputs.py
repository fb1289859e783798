"""New images for a built image-folder task (:meth:`ImageFolder.read_inputs`, used by
``autometa predict``).

Inputs are image files, or a folder of them (searched recursively; hidden files and
folders skipped); a support set is a folder with one sub-folder of images per class, as
:func:`~autometa_plugins.image_folder.loader.scan` reads the task's own. Images are
decoded by the task's own decoder at its size and channels, pixels in [0, 1]. Messages
name the ``autometa predict`` option the path came with.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import torch

from autometa import DataError
from autometa.task import InputBatch
from autometa_plugins.image_folder.loader import IMAGE_SUFFIXES, decode, scan


class Decoding(Protocol):
    """What reading new images needs of a built
    :class:`~autometa_plugins.image_folder.task.ImageFolder` (a protocol: the task imports
    this module, never the other way round)."""

    size: int  # the side images are resized to, in pixels
    input_shape: tuple[int, ...]  # (channels, size, size)
    identity: dict[str, Any]  # the task's settings as the engine built it ("params")


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
            raise DataError(f"{flag} {str(path)!r} is a file; give a folder with one "
                            "sub-folder of images per class")
        folder = scan(path, "classes")
        files = [f for c in folder.classes for f in c.files]
        labels = [c.name for c in folder.classes for _ in c.files]
    elif path.is_dir():
        files = sorted(f for f in path.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES
                       and f.is_file() and not any(p.startswith(".") for p in
                                                   f.relative_to(path).parts))
        if not files:
            raise DataError(f"{flag} {str(path)!r} holds no images "
                            f"({', '.join(sorted(IMAGE_SUFFIXES))}); give image files")
    else:
        files = [path]
    shape = tuple(task.input_shape)
    # Converted to what the model takes: a colour photo for a model of grayscale images
    # becomes grayscale, a gray one for a colour model RGB.
    resize = task.identity.get("params", {}).get("resize", "stretch")
    pixels = decode(files, size=task.size, channels=shape[0], resize=resize)
    x = torch.from_numpy(pixels).float().div_(255)  # (n, C, size, size) in [0, 1]
    ids = [f.relative_to(path).as_posix() if path.is_dir() else f.name for f in files]
    return InputBatch(x, labels, ids, "file")
