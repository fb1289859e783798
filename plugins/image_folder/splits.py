"""Splits a user gives instead of fractions: a split file, or a folder of test images.

A **split file** is a CSV with a header ``name,split``; ``split`` is ``train``, ``val`` or
``test`` (``meta-train``, ``meta-val``, ``meta-test`` too). With few-shot episodes a
``name`` is a class folder (``cat``, or ``<alphabet>/<character>`` in the Omniglot layout);
with ``episodes="split"`` it is an image, relative to the folder (``cat/001.jpg``). Classes
or images the file does not list are not used. A **test folder** (``test_path``, with
``episodes="split"``) holds the same class folders as ``path``: its images are the test
split, and ``val_fraction`` of each class of ``path`` is the val split.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import torch
from torch import Tensor

from autometa import DataError
from autometa_plugins.image_folder.loader import NAME

log = logging.getLogger(__name__)

PARTS = {"train": 0, "meta-train": 0, "val": 1, "meta-val": 1, "test": 2, "meta-test": 2}


def read_split_file(path: Path, names: list[str], what: str) -> list[list[int]]:
    """Indices into ``names`` of the train, val and test parts ``path`` lists (sorted).

    Args:
        what: what a name is, for messages ("class" or "image").

    Raises:
        DataError: an unreadable file, a missing column, an unknown split, names that are
            not in the folder (the first named and the rest counted), a name listed twice,
            an empty part.
    """
    index = {name: i for i, name in enumerate(names)}
    parts: list[list[int]] = [[], [], []]
    unknown: list[str] = []
    seen: set[str] = set()
    try:
        with open(path, newline="") as handle:
            rows = list(csv.DictReader(handle))
            header = rows[0].keys() if rows else []
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{NAME}: cannot read split file {str(path)!r} ({exc}); give a CSV "
                        "with the header name,split") from None
    if not {"name", "split"} <= set(header):
        raise DataError(f"{NAME}: split file {str(path)!r} needs the columns name,split (one "
                        f"row per {what}); it has {', '.join(header) or 'no rows'}")
    for line, row in enumerate(rows, start=2):
        name, part = (row["name"] or "").strip(), (row["split"] or "").strip().lower()
        if part not in PARTS:
            raise DataError(f"{NAME}: split file {str(path)!r} line {line}: split {part!r} is "
                            "not one of train, val, test")
        if name in seen:
            raise DataError(f"{NAME}: split file {str(path)!r} line {line}: {what} {name!r} "
                            "is listed twice; list each once")
        seen.add(name)
        if name not in index:
            unknown.append(name)
        else:
            parts[PARTS[part]].append(index[name])
    if unknown:
        more = f" and {len(unknown) - 1} more" if len(unknown) > 1 else ""
        raise DataError(f"{NAME}: split file {str(path)!r} names {what} {unknown[0]!r}{more} "
                        "that the folder does not hold; fix the names (relative to the "
                        "folder) or add the files")
    left_out = len(names) - len(seen)
    if left_out:
        log.warning("%s: split file %r lists %d of the %d %ss; the %d others are not used",
                    NAME, str(path), len(seen), len(names), what, left_out)
    for part, members in zip(("train", "val", "test"), parts, strict=True):
        if not members:
            raise DataError(f"{NAME}: split file {str(path)!r} lists no {what} for {part}; "
                            "each of train, val and test needs at least one")
    return [sorted(p) for p in parts]


def train_val(labels: Tensor, val_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """A seeded, stratified split of ``labels``' indices: ``val_fraction`` of each class
    (at least one) to val, the rest (at least one) to train; both sorted.

    Raises:
        DataError: a class with fewer than 2 examples.
    """
    g = torch.Generator().manual_seed(seed)
    train, val = [], []
    for c in torch.unique(labels):
        members = torch.nonzero(labels == c).flatten()
        n = len(members)
        if n < 2:
            raise DataError(f"{NAME}: class {int(c)} has {n} image(s) in path; a train/val "
                            "split needs at least 2 per class; add images")
        n_val = min(max(1, round(val_fraction * n)), n - 1)
        shuffled = members[torch.randperm(n, generator=g)]
        val.append(shuffled[:n_val])
        train.append(shuffled[n_val:])
    return torch.cat(train).sort().values, torch.cat(val).sort().values
