"""miniImageNet in Ravi & Larochelle's split (Optimization as a model for few-shot
learning, ICLR 2017): 64 meta-train, 16 meta-val and 20 meta-test classes of 600 images.

Layout (as their ``images.zip`` and CSVs unpack): ``path/train.csv``, ``path/val.csv`` and
``path/test.csv``, each with the header ``filename,label`` and one row per image (the label
is the class's WordNet id, e.g. ``n01532829``), over the images at ``path/images/<filename>``.
Each CSV is one split, read as published; a class's id is its place among the sorted
WordNet ids of its split. Every listed image must exist (checked by listing the folder
once, before any image is decoded); images in the folder that no CSV lists are ignored.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from autometa import DataError
from autometa.image_store import FileImages
from autometa_plugins.fewshot_datasets.benchmark import (
    BenchmarkTask,
    Layout,
    disjoint,
    first_of,
    one_after_another,
    read_lines,
    require,
)
from autometa_plugins.fewshot_datasets.folders import file_names

NAME = "mini-imagenet"
HINT = ("path/train.csv, path/val.csv and path/test.csv (header 'filename,label', the label "
        "a WordNet id) over the images at path/images/<filename>")
CSVS = ("train.csv", "val.csv", "test.csv")


class MiniImageNet(BenchmarkTask):
    """miniImageNet few-shot episodes over Ravi & Larochelle's split (module docstring)."""

    name = NAME
    hint = HINT

    def read(self, root: Path) -> Layout:
        files = [require(root, name, NAME, HINT) for name in CSVS]
        folder = require(root, "images", NAME, HINT, folder=True)
        rows = [_rows(file) for file in files]  # [(line, filename, wnid)] per split
        present = file_names(folder)
        missing = [(csv_name, f"{filename!r} ({csv_name} line {line})")
                   for csv_name, split in zip(CSVS, rows, strict=True)
                   for line, filename, _ in split if filename not in present]
        if missing:
            where = missing[0][0]
            count = sum(1 for m in missing if m[0] == where)
            raise DataError(
                f"{NAME}: {where} names {count} image(s) missing from {str(folder)!r}: "
                f"{first_of([m[1] for m in missing if m[0] == where], 'missing')}; the layout "
                f"is {HINT}; restore the images, or use the CSVs that came with them")
        wnids = [sorted({wnid for _, _, wnid in split}) for split in rows]
        disjoint(wnids, CSVS, NAME)
        class_names, splits = one_after_another(wnids)
        ids = {w: i for i, w in enumerate(class_names)}
        labels = np.array([ids[wnid] for split in rows for _, _, wnid in split], dtype=np.int64)
        images = [folder / filename for split in rows for _, filename, _ in split]
        return Layout(FileImages(images, slot=str(folder.resolve())), labels, class_names,
                      splits, CSVS, store=NAME,
                      facts={"format": "Ravi & Larochelle's CSVs"})


def _rows(file: Path) -> list[tuple[int, str, str]]:
    """``(line, filename, label)`` for each row of a split CSV (header checked)."""
    lines = read_lines(file, NAME)
    reader = csv.reader(lines)
    header = next(reader, None)
    if header is None or [h.strip() for h in header] != ["filename", "label"]:
        raise DataError(f"{NAME}: {str(file)!r} starts with {','.join(header or []) or 'nothing'!r}"
                        ", not the header 'filename,label'; the layout is " + HINT)
    rows = []
    for line, row in enumerate(reader, 2):
        if not row or not "".join(row).strip():
            continue
        if len(row) != 2 or not row[0].strip() or not row[1].strip():
            raise DataError(f"{NAME}: {str(file)!r} line {line} is {','.join(row)!r}, not "
                            "'<filename>,<WordNet id>'; fix or remove the line")
        rows.append((line, row[0].strip(), row[1].strip()))
    if not rows:
        raise DataError(f"{NAME}: {str(file)!r} lists no images; the layout is {HINT}")
    return rows

