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

from autometa.images import read_new_images
from autometa.task import InputBatch
from autometa_plugins.image_folder.loader import NAME, scan


class Decoding(Protocol):
    """What reading new images needs of a built
    :class:`~autometa_plugins.image_folder.task.ImageFolder` (a protocol: the task imports
    this module, never the other way round)."""

    input_shape: tuple[int, ...]  # (channels, size, size)
    identity: dict[str, Any]  # the task's settings as the engine built it ("params")


def read_images(task: Decoding, path: Path, *, labelled: bool) -> InputBatch:
    """The images at ``path`` decoded for ``task``
    (:func:`autometa.images.read_new_images`); a support set is a folder with one
    sub-folder of images per class, as the task's own.

    Raises:
        DataError: a support path that is a file, a folder without images, an image that
            cannot be decoded.
    """
    resize = task.identity.get("params", {}).get("resize", "stretch")
    return read_new_images(path, labelled=labelled, support=_support,
                           support_hint="a folder with one sub-folder of images per class",
                           input_shape=task.input_shape, resize=resize, name=NAME)


def _support(path: Path) -> tuple[list[Path], list[Any]]:
    folder = scan(path, "classes")
    return ([f for c in folder.classes for f in c.files],
            [c.name for c in folder.classes for _ in c.files])
