"""Reading a CSV task's file and checking its columns: duplicate names, the kind a
target column implies, mixed types, missing values (the rules in the docstring of
:mod:`~autometa_plugins.csvfile.task`). Shared by the task and by its reader of new rows
(:mod:`~autometa_plugins.csvfile.inputs`).

Rows are numbered in messages from 1, counting the data rows under the header.
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from pandas.api.types import is_bool_dtype, is_numeric_dtype
from torch import Tensor

from autometa import ConfigError, DataError
from autometa.errors import unknown
from autometa.numeric_inputs import read_frame

log = logging.getLogger(__name__)

#: kind="auto": an integer-valued numeric target with at most this many values is classes.
AUTO_MAX_CLASSES = 20
#: A text column with more than this share of number-like cells is a mixed-types error.
MIXED_NUMERIC_SHARE = 0.5
#: The widest CSV read (columns), and the longest header line (bytes): a wider file is
#: refused before pandas parses it (a 1,000,000-column header took minutes and gigabytes).
MAX_COLUMNS = 100_000
MAX_HEADER_BYTES = 4 << 20


def read_csv(path: Path, name: str) -> pd.DataFrame:
    """The file's rows; one DataError if it is missing, unreadable, empty or has no rows."""
    if not path.exists():
        where = "" if path.is_absolute() else f" (relative to the working directory {os.getcwd()})"
        raise DataError(f"{name} does not exist{where}; pass the path of an existing CSV file")
    if path.is_dir():
        raise DataError(f"{name} is a directory; expected a CSV file")
    _check_width(path, name)
    frame = read_frame(path, name)
    _check_unique_columns(path, name)
    return frame


def _check_width(path: Path, name: str) -> None:
    """DataError if the header line (the first non-empty one) is longer than
    :data:`MAX_HEADER_BYTES` or names more than :data:`MAX_COLUMNS` columns; read with a
    bound, before pandas."""
    try:
        with open(path, "rb") as file:
            line = b""
            while not line.strip():
                line = file.readline(MAX_HEADER_BYTES + 1)
                if not line:
                    return  # empty: read_frame says so
                if len(line) > MAX_HEADER_BYTES:
                    raise DataError(f"{name}: the header line is longer than "
                                    f"{MAX_HEADER_BYTES >> 20} MiB; a CSV task reads at most "
                                    f"{MAX_COLUMNS:,} columns: select the columns you need")
    except OSError:
        return  # read_frame names the problem
    columns = len(next(csv.reader([line.decode("utf-8-sig", "replace")]), []))
    if columns > MAX_COLUMNS:
        raise DataError(f"{name}: the header names {columns:,} columns; a CSV task reads at "
                        f"most {MAX_COLUMNS:,}: select the columns you need")


def _check_unique_columns(path: Path, name: str) -> None:
    """DataError if a column name appears twice in the header (module docstring).

    pandas renames a repeated ``label`` to ``label.1``, so its columns cannot tell: the
    header row (the first non-empty line, as pandas reads it) is read again here.
    """
    with open(path, newline="", encoding="utf-8-sig") as file:  # pandas drops a BOM too
        header = next((row for row in csv.reader(file) if row), [])
    positions: dict[str, list[int]] = {}
    for position, column in enumerate(header, start=1):
        if column:  # pandas names empty ones "Unnamed: <i>": distinct
            positions.setdefault(column, []).append(position)
    repeated = [(column, at) for column, at in positions.items() if len(at) > 1]
    if repeated:
        column, at = repeated[0]
        more = f" (and {len(repeated) - 1} other repeated name(s))" if len(repeated) > 1 else ""
        listed = ", ".join(map(str, at[:-1])) + f" and {at[-1]}"
        raise DataError(
            f"{name}: column name {column!r} appears {len(at)} times in the header (columns "
            f"{listed}){more}; pandas would read the copy as {column + '.1'!r}, a feature "
            f"(the target leaking into the features if {column!r} is the target); rename or "
            "drop one of them")


def infer_kind(y: pd.Series) -> str:
    """kind="auto": classification for text/boolean or few integer values (module docstring)."""
    if not is_number(y):  # text or booleans
        return "classification"
    values = y.to_numpy(float)
    if np.all(values == np.round(values)) and len(np.unique(values)) <= AUTO_MAX_CLASSES:
        return "classification"
    return "regression"


def feature_columns(frame: pd.DataFrame, target: str, features: Sequence[str] | str | None,
                     name: str) -> list[str]:
    columns = [str(c) for c in frame.columns]
    if target not in columns:
        raise DataError(f"{name}: {unknown('target column', target, columns)}")
    if features is None:
        chosen = [c for c in columns if c != target]
    else:
        if isinstance(features, str):  # "a,b" from the command line, unless it is one column
            features = [features] if features in columns else features.split(",")
        chosen = [str(f).strip() for f in features]
        for column in chosen:
            if column not in columns:
                raise DataError(f"{name}: {unknown('feature column', column, columns)}")
        if target in chosen:
            raise ConfigError(f"{name}: column {target!r} is the target; remove it from "
                              "features")
        repeated = sorted({c for c in chosen if chosen.count(c) > 1})
        if repeated:
            raise ConfigError(f"{name}: features lists {repeated} more than once; list each "
                              "column once")
    if not chosen:
        raise DataError(f"{name}: no feature columns besides the target {target!r}; add "
                        "columns or list them in features")
    return chosen


def is_number(s: pd.Series) -> bool:
    return is_numeric_dtype(s) and not is_bool_dtype(s)


def _row(index: Any) -> int:
    """1-based data row of a default (RangeIndex) label."""
    return int(index) + 1


def numbers_or_text(s: pd.Series, column: str, name: str) -> pd.Series:
    """The column as numbers or as text; DataError if it mixes them (module docstring)."""
    if is_numeric_dtype(s):  # numbers or booleans, as pandas read them
        return s
    filled = s.dropna()
    parsed = pd.to_numeric(filled.astype(str).str.strip(), errors="coerce")
    numeric = parsed.notna()
    if len(filled) and bool(numeric.all()):
        return pd.to_numeric(s.where(s.notna()).astype(str).str.strip(), errors="coerce")
    if len(filled) and numeric.mean() > MIXED_NUMERIC_SHARE:
        first = filled.index[~numeric.to_numpy()][0]
        raise DataError(
            f"{name}: column {column!r} mixes numbers and text: {int(numeric.sum())} of "
            f"{len(filled)} filled cells are numbers, but row {_row(first)} holds "
            f"{str(s[first])!r}; correct the non-numeric cells (leave a missing value empty)")
    return s


def _missing(s: pd.Series) -> pd.Series:
    """Rows that are missing (empty, NA, NaN) or, for numbers, infinite."""
    bad = s.isna()
    if is_number(s):
        bad |= ~np.isfinite(s.to_numpy(float))
    return bad


def check_target_present(y: pd.Series, target: str, name: str) -> None:
    bad = _missing(y)
    if bool(bad.any()):
        raise DataError(
            f"{name}: target column {target!r} is missing (empty, NA) or infinite in "
            f"{int(bad.sum())} of {len(y)} rows (first: row {_row(bad.idxmax())}); fill in "
            "or drop those rows")


def check_features_present(columns: dict[str, pd.Series], name: str) -> None:
    problems = []
    for column, s in columns.items():
        bad = _missing(s)
        if bool(bad.any()):
            problems.append(f"{column!r} in {int(bad.sum())} row(s) (first: row "
                            f"{_row(bad.idxmax())})")
    if problems:
        raise DataError(
            f"{name}: feature column(s) hold missing (empty, NA, NaN) or infinite values: "
            f"{', '.join(problems)}; values are not imputed: fill in or drop those rows, or "
            "leave the column out of features")


def class_name(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def warn_wide_categoricals(frame: pd.DataFrame, name: str) -> None:
    """An identifier-like text column (a value per row) one-hot encodes to noise; say so."""
    for column in frame.columns:
        if not is_numeric_dtype(frame[column]):
            distinct = frame[column].nunique()
            if distinct > 50 and distinct > len(frame) // 2:
                log.warning("%s: text column %r has %d distinct values in %d rows, one-hot "
                            "encoded as as many features; leave it out of features if it is "
                            "an identifier", name, column, distinct, len(frame))


def split_rows(frame: pd.DataFrame, column: str, episodes: str, name: str
               ) -> tuple[Tensor, Tensor, Tensor]:
    """Row positions of the train, val and test parts that ``column`` names.

    Raises:
        ConfigError: few-shot episodes (their split is of classes, not rows).
        DataError: an unknown column, a value other than train/val/test (naming the row),
            or a part without rows.
    """
    if episodes != "split":
        raise ConfigError(f"{name}: split_column splits rows, which needs episodes='split'")
    columns = [str(c) for c in frame.columns]
    if column not in columns:
        raise DataError(f"{name}: {unknown('split column', column, columns)}")
    values = frame[column].astype(str).str.strip().str.lower()
    bad = ~values.isin(("train", "val", "test"))
    if bool(bad.any()):
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise DataError(f"{name}: split column {column!r} row {row + 1} holds "
                        f"{str(frame[column].iloc[row])!r}; each row must be train, val or "
                        "test")
    parts = tuple(torch.as_tensor(np.flatnonzero((values == part).to_numpy()))
                  for part in ("train", "val", "test"))
    for part, rows in zip(("train", "val", "test"), parts, strict=True):
        if len(rows) == 0:
            raise DataError(f"{name}: split column {column!r} names no {part} row; each of "
                            "train, val and test needs at least one")
    return parts  # type: ignore[return-value]
