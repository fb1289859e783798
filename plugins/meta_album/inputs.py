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

from autometa import DataError
from autometa.images import read_new_images
from autometa.task import InputBatch
from autometa_plugins.meta_album.reader import FORMAT_HINT, LABELS, NAME, read_domain


class Decoding(Protocol):
    """What reading new images needs of a built
    :class:`~autometa_plugins.meta_album.task.MetaAlbum` (a protocol: the task imports this
    module, never the other way round)."""

    input_shape: tuple[int, ...]  # (channels, size, size)
    resize: str  # the task's resize policy


def read_images(task: Decoding, path: Path, *, labelled: bool) -> InputBatch:
    """The images at ``path`` decoded for ``task`` (see the module docstring and
    :func:`autometa.images.read_new_images`).

    Raises:
        DataError: a support path that is not a Meta-Album dataset, a folder without
            images, an image that cannot be decoded.
    """
    return read_new_images(path, labelled=labelled, support=_support,
                           support_hint=f"one Meta-Album dataset folder: {FORMAT_HINT}",
                           input_shape=task.input_shape, resize=task.resize, name=NAME)


def _support(path: Path) -> tuple[list[Path], list[Any]]:
    if not (path / LABELS).is_file():
        raise DataError(f"{NAME}: --support {str(path)!r} is not a Meta-Album dataset; give "
                        f"one dataset folder: {FORMAT_HINT}")
    domain = read_domain(path.parent, path.name)
    return ([f for per_class in domain.files for f in per_class],
            [c for c, per_class in zip(domain.classes, domain.files, strict=True)
             for _ in per_class])
