"""New images for a built benchmark task (:meth:`BenchmarkTask.read_inputs`, used by
``autometa predict``), decoded exactly as the task decoded its own: its size, channels and
resize policy, pixels in [0, 1].

Inputs are image files, or a folder of them (searched recursively, hidden entries
skipped); a support set is a folder with one sub-folder of images per class (the class
name is the folder's). Messages name the ``autometa predict`` option the path came with.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Protocol

from autometa.images import read_new_images
from autometa.task import InputBatch
from autometa_plugins.fewshot_datasets.folders import class_folders


class Decoding(Protocol):
    """What reading new images needs of a built task (a protocol: the task imports this
    module, never the other way round)."""

    name: str  # the registered name, in messages
    resize: str  # the resize policy
    input_shape: tuple[int, ...]  # (channels, size, size)


def read_images(task: Decoding, path: Path, *, labelled: bool) -> InputBatch:
    """The images at ``path`` decoded for ``task`` (see the module docstring and
    :func:`autometa.images.read_new_images`).

    Raises:
        DataError: a support path that is a file, a folder without images, an image that
            cannot be decoded.
    """
    return read_new_images(path, labelled=labelled,
                           support=functools.partial(_support, name=task.name),
                           support_hint="a folder with one sub-folder of images per class",
                           input_shape=task.input_shape, resize=task.resize, name=task.name)


def _support(path: Path, *, name: str) -> tuple[list[Path], list[Any]]:
    classes = class_folders(path, name, "--support <folder>/<class>/<image>")
    return ([f for _, images in classes for f in images],
            [label for label, images in classes for _ in images])
