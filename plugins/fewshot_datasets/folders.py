"""Listing a dataset's folders without opening anything in them.

Only regular files (after following a symlink) are images and only folders are folders:
a FIFO, a socket, a dangling symlink or a symlink loop is skipped, never opened (reading a
FIFO blocks forever). Hidden entries (``.name``, ``__MACOSX``) are skipped too. The layouts
read here have a fixed depth, so no listing recurses through a loop.
"""

from __future__ import annotations

import os
from pathlib import Path

from autometa import DataError
from autometa.images import IMAGE_SUFFIXES


def visible(folder: Path) -> tuple[list[Path], list[Path]]:
    """The image files and the folders in ``folder``, sorted by name; hidden entries and
    anything that is neither a regular file nor a folder (a FIFO, a dangling or looping
    symlink) skipped without being opened."""
    images: list[Path] = []
    dirs: list[Path] = []
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.name.startswith(".") or entry.name == "__MACOSX":
                continue
            try:
                if entry.is_dir():
                    dirs.append(Path(entry.path))
                elif entry.is_file() and Path(entry.name).suffix.lower() in IMAGE_SUFFIXES:
                    images.append(Path(entry.path))
            except OSError:  # a symlink loop, no permission: not data
                continue
    return sorted(images), sorted(dirs)


def class_folders(split_dir: Path, name: str, hint: str) -> list[tuple[str, list[Path]]]:
    """``(class folder name, its images)`` for each class folder of ``split_dir``.

    Raises:
        DataError: no class folders, or a class folder without images.
    """
    _, dirs = visible(split_dir)
    if not dirs:
        raise DataError(f"{name}: {str(split_dir)!r} has no class folders; the layout is "
                        f"{hint}")
    classes = []
    for folder in dirs:
        images, _ = visible(folder)
        if not images:
            raise DataError(f"{name}: class folder {str(folder)!r} holds no images "
                            f"({', '.join(sorted(IMAGE_SUFFIXES))}); add its images or "
                            "remove it")
        classes.append((folder.name, images))
    return classes


def file_names(folder: Path) -> set[str]:
    """The names of the regular files in ``folder`` (one listing, nothing opened; empty if
    it is not a folder): how a reader checks that listed images exist."""
    if not folder.is_dir():
        return set()
    names = set()
    with os.scandir(folder) as entries:
        for entry in entries:
            try:
                if entry.is_file():
                    names.add(entry.name)
            except OSError:  # a symlink loop: not an image
                continue
    return names
