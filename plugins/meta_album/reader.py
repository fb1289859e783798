"""Reading a folder of Meta-Album datasets: its domains, each one's classes and image files.

Meta-Album's format (github.com/ihsaan-ullah/meta-album, ``DataFormat/README.md``; Ullah et
al., "Meta-Album: Multi-domain Meta-Dataset for Few-Shot Image Classification", NeurIPS 2022
Datasets and Benchmarks) is one folder per dataset::

    <path>/<DATASET>/labels.csv     one row per image: FILE_NAME, CATEGORY, SUPER_CATEGORY
    <path>/<DATASET>/info.json      optional here: names the columns, and more
    <path>/<DATASET>/images/<file>  the images (128 x 128 in the released datasets)

``info.json`` names the image and category columns (``image_column_name``,
``category_column_name``; defaults ``FILE_NAME`` and ``CATEGORY``), says whether the CSV
is tab-separated (``csv_with_tab``) and whether the images sit in ``images/`` or beside
``labels.csv`` (``images_in_sub_folder``, default true). A trailing comma before a closing
brace is tolerated (Meta-Album's own sample ``info.json`` has one). The super-category is
not used. Each dataset is a *domain*; its classes are its categories, sorted by name, and
each class's images keep the CSV's row order.

Every problem is one :class:`~autometa.DataError` (or :class:`~autometa.ConfigError` for
the ``domains`` setting) naming the folder or file, what was expected and the fix. Reading
opens the CSVs and JSON files and checks that every named image is a regular file; the
images themselves are decoded later, into the task's store.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from autometa import ConfigError, DataError
from autometa.errors import unknown

NAME = "meta-album"
LABELS, INFO, IMAGES = "labels.csv", "info.json", "images"
#: Meta-Album's column names, used when a dataset has no ``info.json`` (or it names none).
DEFAULT_COLUMNS = {"image_column_name": "FILE_NAME", "category_column_name": "CATEGORY"}
FORMAT_HINT = ("<dataset>/labels.csv (columns FILE_NAME, CATEGORY) with the images in "
               "<dataset>/images/")


@dataclass(frozen=True)
class Domain:
    """One dataset: its name (the folder), its classes (sorted) and their image files."""

    name: str
    classes: tuple[str, ...]
    files: tuple[tuple[Path, ...], ...]  # per class, in the CSV's row order

    @property
    def images(self) -> int:
        return sum(len(f) for f in self.files)


def read(root: Path, domains: str | None = None) -> list[Domain]:
    """The domains of ``root`` named in ``domains`` (comma-separated folder names; None:
    every folder), sorted by name (the order does not change the task).

    Raises:
        DataError: ``root`` missing or a file, no dataset folders, a dataset without
            ``labels.csv`` or its columns, an unreadable CSV or ``info.json``, missing images.
        ConfigError: ``domains`` names a folder ``root`` does not have, or one twice.
    """
    return [read_domain(root, name) for name in select(root, domains)]


def select(root: Path, domains: str | None) -> list[str]:
    """The dataset folder names chosen by ``domains`` (see :func:`read`)."""
    if not root.exists():
        where = "" if root.is_absolute() else f" (relative to the working directory {Path.cwd()})"
        raise DataError(f"{NAME}: path {str(root)!r} does not exist{where}; give a folder of "
                        f"Meta-Album datasets, each {FORMAT_HINT}")
    if not root.is_dir():
        raise DataError(f"{NAME}: path {str(root)!r} is a file, not a folder; give a folder of "
                        f"Meta-Album datasets, each {FORMAT_HINT}")
    if (root / LABELS).is_file():
        raise DataError(f"{NAME}: {str(root)!r} is one dataset (it holds {LABELS}); path is the "
                        f"folder holding the datasets: give path={str(root.parent)!r} and "
                        f"domains={root.name!r} (or more)")
    available = sorted(p.name for p in root.iterdir()
                       if p.is_dir() and not p.name.startswith(".") and p.name != "__MACOSX")
    if not available:
        raise DataError(f"{NAME}: {str(root)!r} has no dataset folders; expected one folder "
                        f"per Meta-Album dataset, each {FORMAT_HINT}")
    if domains is None:
        return available
    names = [n.strip() for n in domains.split(",") if n.strip()]
    if not names:
        raise ConfigError(f"{NAME}: domains={domains!r} names no dataset; give a comma-"
                          f"separated list of folders of {str(root)!r}, e.g. "
                          f"domains={','.join(available[:2])!r}, or leave it out for all")
    for name in names:
        if name not in available:
            raise ConfigError(f"{NAME}: {unknown('domain', name, available)} (the dataset "
                              f"folders of {str(root)!r})")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(f"{NAME}: domains names {twice[0]!r} twice; name each dataset once")
    return sorted(names)


def read_domain(root: Path, name: str) -> Domain:
    """Dataset folder ``root/name``: its ``info.json`` (if any), its ``labels.csv``, and the
    check that every image it names exists."""
    folder = root / name
    labels = folder / LABELS
    if not labels.is_file():
        raise DataError(f"{NAME}: dataset folder {str(folder)!r} has no {LABELS}; a Meta-Album "
                        f"dataset is {FORMAT_HINT}; add it, or leave the folder out with "
                        "domains=<the other datasets, comma-separated>")
    info = _info(folder)
    image_col, category_col = (str(info.get(k) or v) for k, v in DEFAULT_COLUMNS.items())
    table = _csv(labels, "\t" if info.get("csv_with_tab") else ",")
    source = f"{str(folder / INFO)!r}" if (folder / INFO).is_file() else "Meta-Album's defaults"
    missing = [c for c in (image_col, category_col) if c not in table.columns]
    if missing:
        raise DataError(
            f"{NAME}: {str(labels)!r} has no column {', '.join(map(repr, missing))}: the image "
            f"and category columns are {image_col!r} and {category_col!r} (from {source}), its "
            f"columns are {list(map(str, table.columns))}; rename them, or name the columns in "
            f"{INFO} (image_column_name, category_column_name)")
    if table.empty:
        raise DataError(f"{NAME}: {str(labels)!r} has no rows; list one image per row "
                        f"({image_col}, {category_col})")
    blank = (table[image_col] == "") | (table[category_col] == "")
    if bool(blank.any()):
        row = int(blank.to_numpy().nonzero()[0][0])
        raise DataError(f"{NAME}: {str(labels)!r} row {row + 2} has an empty {image_col} or "
                        f"{category_col}; fill it in or delete the row")
    images = folder / IMAGES if info.get("images_in_sub_folder", True) else folder
    paths = [images / f for f in table[image_col]]
    absent = [i for i, p in enumerate(paths) if not p.is_file()]  # never opens: a FIFO is absent
    if absent:
        first = absent[0]
        raise DataError(
            f"{NAME}: {len(absent)} of the {len(paths)} image(s) named in {str(labels)!r} are "
            f"not files in {str(images)!r} (first: {table[image_col].iloc[first]!r}, row "
            f"{first + 2}); restore them, or delete their rows")
    by_class: dict[str, list[Path]] = {}
    for path, category in zip(paths, table[category_col], strict=True):
        by_class.setdefault(category, []).append(path)
    classes = tuple(sorted(by_class))
    return Domain(name, classes, tuple(tuple(by_class[c]) for c in classes))


def _info(folder: Path) -> dict[str, Any]:
    """The dataset's ``info.json`` ({} without one)."""
    path = folder / INFO
    if not path.is_file():
        return {}
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{NAME}: cannot read {str(path)!r} ({type(exc).__name__}); fix or "
                        "delete it (the default column names are then used)") from None
    try:
        info = json.loads(text)
    except json.JSONDecodeError:
        try:  # Meta-Album's sample info.json ends its object with a trailing comma
            info = json.loads(re.sub(r",\s*([}\]])", r"\1", text))
        except json.JSONDecodeError as exc:
            raise DataError(f"{NAME}: {str(path)!r} is not JSON ({exc.msg}, line {exc.lineno}); "
                            "fix it, or delete it to use the default column names") from None
    if not isinstance(info, dict):
        raise DataError(f"{NAME}: {str(path)!r} holds a JSON {type(info).__name__}, not an "
                        "object; fix it, or delete it to use the default column names")
    return info


def _csv(path: Path, sep: str) -> pd.DataFrame:
    """``labels.csv`` as text cells (a category "NA" stays "NA"), names and cells stripped."""
    try:
        table = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False,
                            skipinitialspace=True)
    except pd.errors.EmptyDataError:
        raise DataError(f"{NAME}: {str(path)!r} is empty; list one image per row with its "
                        "category (columns FILE_NAME, CATEGORY)") from None
    except (pd.errors.ParserError, UnicodeDecodeError, OSError) as exc:
        brief = " ".join(str(exc).split())[:200]
        raise DataError(f"{NAME}: cannot read {str(path)!r} as a CSV ({brief}); fix the "
                        "file") from None
    table.columns = [str(c).strip() for c in table.columns]
    return table.apply(lambda column: column.str.strip())
