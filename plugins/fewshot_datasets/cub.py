"""CUB-200-2011 (Wah et al. 2011; 200 bird species, 11,788 images) in the few-shot split of
Chen et al., A Closer Look at Few-shot Classification (ICLR 2019): 100/50/50 classes.

Layout (as ``CUB_200_2011.tgz`` unpacks): ``path/classes.txt`` (``<class id> <class
folder>`` per line), ``path/images.txt`` (``<image id> <class folder>/<file>.jpg``),
``path/image_class_labels.txt`` (``<image id> <class id>``) and the images at
``path/images/<class folder>/<file>.jpg``.

The split is Chen et al.'s rule (``filelists/CUB/write_CUB_filelist.py`` in
github.com/wyharveychen/CloserLookFewShot): the class folders sorted by name, the i-th
(from 0) is meta-train if ``i % 2 == 0``, meta-val if ``i % 4 == 1`` and meta-test if
``i % 4 == 3``. With split lists ``path/splits/{train,val,test}.txt`` (one class folder
name per line) those are used instead. Every listed image must exist (one listing per class
folder, before any image is decoded).
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

import numpy as np

from autometa import DataError
from autometa.image_store import FileImages
from autometa_plugins.fewshot_datasets.benchmark import (
    BenchmarkTask,
    Layout,
    disjoint,
    first_of,
    lookup,
    read_lines,
    read_names,
    require,
)
from autometa_plugins.fewshot_datasets.folders import file_names

NAME = "cub"
HINT = ("CUB-200-2011's path/classes.txt, path/images.txt, path/image_class_labels.txt and "
        "path/images/<class folder>/<file>.jpg")
LISTS = "splits"
SPLIT_NAMES = ("train", "val", "test")


class CUB(BenchmarkTask):
    """CUB-200-2011 few-shot episodes over Chen et al.'s split (module docstring)."""

    name = NAME
    hint = HINT

    def read(self, root: Path) -> Layout:
        texts = [require(root, f, NAME, HINT) for f in
                 ("classes.txt", "images.txt", "image_class_labels.txt")]
        folder = require(root, "images", NAME, HINT, folder=True)
        lists = [require(root, f"{LISTS}/{s}.txt", NAME, HINT) for s in SPLIT_NAMES] \
            if (root / LISTS).exists() else []
        classes, images, labels = (_numbered(t) for t in texts)
        unlabelled = [f"image {i} (images.txt line {line})" for i, (line, _) in images.items()
                      if i not in labels]
        if unlabelled:
            raise DataError(f"{NAME}: image_class_labels.txt gives no class for "
                            f"{len(unlabelled)} image(s) of images.txt: "
                            f"{first_of(unlabelled, 'unlabelled')}; use the files of one release")
        unknown = [f"class {value} (image_class_labels.txt line {line})"
                   for line, value in labels.values() if _int(value) not in classes]
        if unknown:
            raise DataError(f"{NAME}: image_class_labels.txt names {len(unknown)} class id(s) "
                            f"not in classes.txt: {first_of(unknown, 'unknown')}; use the "
                            "files of one release")
        _check_present(folder, images)
        names = sorted(name for _, name in classes.values())  # Chen et al. sort the folders
        index = {name: i for i, name in enumerate(names)}
        if lists:
            listed = [read_names(f, NAME) for f in lists]
            splits = [lookup(n, index, f, NAME, "classes.txt") for n, f in zip(listed, lists,
                                                                                strict=True)]
            split_from = (f"{LISTS}/train.txt", f"{LISTS}/val.txt", f"{LISTS}/test.txt")
            disjoint([[names[c] for c in s] for s in splits], split_from, NAME)
        else:
            splits = [[i for i in range(len(names)) if i % 2 == 0],
                      [i for i in range(len(names)) if i % 4 == 1],
                      [i for i in range(len(names)) if i % 4 == 3]]
            split_from = ("even classes", "classes 1 mod 4", "classes 3 mod 4")
        order = sorted(images)  # images.txt's ids
        files = [folder / images[i][1] for i in order]
        y = np.array([index[classes[_int(labels[i][1])][1]] for i in order], dtype=np.int64)
        return Layout(FileImages(files, slot=str(folder.resolve())), y, names,
                      (splits[0], splits[1], splits[2]), split_from, store=NAME,
                      facts={"format": "CUB-200-2011",
                             "split": "split lists" if lists else "Chen et al. 2019"})


def _int(text: str) -> int:
    return int(text) if text.isdigit() else -1


def _numbered(path: Path) -> dict[int, tuple[int, str]]:
    """``{id: (line, value)}`` for a file of ``<id> <value>`` lines (CUB's lists)."""
    out: dict[int, tuple[int, str]] = {}
    for line, text in enumerate(read_lines(path, NAME), 1):
        if not text.strip():
            continue
        parts = text.split(maxsplit=1)
        if len(parts) != 2 or not parts[0].isdigit():
            raise DataError(f"{NAME}: {str(path)!r} line {line} is {text.strip()!r}, not "
                            "'<id> <value>'; use the published file")
        key = int(parts[0])
        if key in out:
            raise DataError(f"{NAME}: {str(path)!r} gives id {key} twice (lines {out[key][0]} "
                            f"and {line}); use the published file")
        out[key] = (line, parts[1].strip())
    if not out:
        raise DataError(f"{NAME}: {str(path)!r} is empty; the layout is {HINT}")
    return out


def _check_present(folder: Path, images: dict[int, tuple[int, str]]) -> None:
    """Raise DataError naming the first image of images.txt that is not on disk (and
    counting the rest), listing each class folder once."""
    listed: dict[str, set[str]] = {}
    missing = []
    for line, relative in sorted(images.values()):
        parts = PurePosixPath(relative).parts
        if relative.startswith("/") or ".." in parts or not parts:
            raise DataError(f"{NAME}: images.txt line {line} names {relative!r}, outside "
                            f"{str(folder)!r}; image paths are <class folder>/<file>.jpg")
        sub = str(PurePosixPath(*parts[:-1]))
        if sub not in listed:
            listed[sub] = file_names(folder / sub)
        if parts[-1] not in listed[sub]:
            missing.append(f"{relative!r} (line {line})")
    if missing:
        raise DataError(f"{NAME}: images.txt names {len(missing)} image(s) missing from "
                        f"{str(folder)!r}: {first_of(missing, 'missing')}; restore them, or "
                        "unpack the whole release")
