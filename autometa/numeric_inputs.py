"""New inputs as a CSV of numbers: the default of :meth:`Task.read_inputs`.

One column per input value (``input_shape`` flattened in C order), one data row per input,
given to the model as they are. A support file adds its labels: a ``label`` column for
classification, ``target`` (or ``target_<i>`` for several dimensions) for regression.
A task that preprocesses its data cannot be served by this reader without a support set
in the same units; it overrides :meth:`~autometa.task.Task.read_inputs`.

Messages name the ``autometa predict`` option the file came with (``--input`` or
``--support``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from autometa.errors import DataError

__all__ = ["LABEL", "TARGET", "InputBatch", "read_frame", "read_numbers"]

#: The column holding class labels (classification).
LABEL = "label"
#: ... and the regression targets' column (``target_<i>`` for several).
TARGET = "target"


@dataclass(frozen=True)
class InputBatch:
    """New examples read from a file or folder by :meth:`Task.read_inputs`.

    Attributes:
        x: (n, *input_shape) float32 on the CPU, encoded as the task encodes its own data.
        labels: with ``labelled=True``, n labels: class names, or regression targets as
            rows of floats (n, output_size); otherwise None.
        ids: one per input, naming it in the output: a file name, or the CSV's data row
            counted from 0.
        id_name: what the ids are: ``"file"`` or ``"row"``.
    """

    x: Tensor
    labels: list[Any] | None
    ids: list[Any]
    id_name: str


class Shaped(Protocol):
    """What the reader needs of a :class:`~autometa.task.Task` (a protocol: this module
    sits below the task contract, whose default ``read_inputs`` it is)."""

    @property
    def kind(self) -> str:
        """``"classification"`` or ``"regression"``."""
        ...

    @property
    def input_shape(self) -> tuple[int, ...]:
        """One example's shape."""
        ...


def read_numbers(task: Shaped, path: Path, *, labelled: bool) -> InputBatch:
    """The inputs (and, if ``labelled``, labels) in the CSV file at ``path`` for ``task``
    (a :class:`~autometa.task.Task`).

    Raises:
        DataError: ``path`` is a folder or not a readable CSV with data rows; the feature
            columns are not one per input value or hold something other than numbers; a
            support file has no label column.
    """
    flag = "--support" if labelled else "--input"
    if path.is_dir():
        raise DataError(f"{flag} {str(path)!r} is a folder; this study's task reads a CSV "
                        "file of feature rows")
    frame = read_frame(path, f"{flag} {str(path)!r}")
    shape = tuple(task.input_shape)
    regression = task.kind == "regression"
    names = [str(c) for c in frame.columns]
    if all(_is_number(n) for n in names):  # pandas took the first data row for a header
        raise DataError(f"{flag} {str(path)!r}: its first line ({', '.join(names[:4])}) is "
                        "numbers, not column names; add a header row (e.g. x0,x1,...)")
    label_cols = ([c for c in names if c == TARGET or c.startswith(f"{TARGET}_")]
                  if regression else [c for c in names if c == LABEL])
    features = [c for c in names if c not in label_cols]
    want = math.prod(shape)
    if len(features) != want:
        raise DataError(f"{flag}: {len(features)} feature column(s) {features[:5]}, but the "
                        f"model takes {want} value(s) per input (shape {shape}); give one "
                        f"column per value{_label_hint(regression)}")
    if labelled and not label_cols:
        raise DataError(f"{flag}: no label column; name it "
                        f"{'target' if regression else 'label'!r}")
    values = frame[features].apply(pd.to_numeric, errors="coerce")
    bad = values.isna().to_numpy() | ~np.isfinite(values.to_numpy(float))
    if bad.any():
        row, col = (int(i[0]) for i in np.nonzero(bad))
        raise DataError(f"{flag}: column {features[col]!r} row {row + 1} holds "
                        f"{str(frame[features[col]].iloc[row])!r}; every feature must be a "
                        "number")
    x = torch.tensor(values.to_numpy(float), dtype=torch.float32).reshape(-1, *shape)
    labels: list[Any] | None = None
    if labelled:
        y = frame[label_cols]
        labels = y.to_numpy(float).tolist() if regression else \
            [label_name(v) for v in y[LABEL].tolist()]
    return InputBatch(x, labels, list(range(len(frame))), "row")


def read_frame(path: Path, name: str) -> pd.DataFrame:
    """The CSV file's rows (a header row, then data); one DataError naming ``name`` if it
    cannot be read or has no data rows."""
    try:
        frame = pd.read_csv(path, low_memory=False)
    except pd.errors.EmptyDataError:
        raise DataError(f"{name} is empty; expected a header row of column names, then one "
                        "row per example") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{name} is not a readable CSV: not UTF-8 text ({exc.reason} at byte "
                        f"{exc.start}); save it as a UTF-8 CSV file") from None
    except (pd.errors.ParserError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise DataError(f"{name} is not a readable CSV ({reason}); expected the same number "
                        "of comma-separated fields on every line") from None
    except OSError as exc:
        raise DataError(f"{name} cannot be read ({exc.strerror or exc}); check that it is a "
                        "readable file") from None
    if len(frame) == 0:
        raise DataError(f"{name} has a header ({len(frame.columns)} column(s)) but no data "
                        "rows; add rows")
    return frame


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _label_hint(regression: bool) -> str:
    return (f" (besides {TARGET!r} or {TARGET}_<i> target columns)" if regression else
            f" (besides an optional {LABEL!r} column)")


def label_name(value: Any) -> str:
    """A class label as text: ``3.0`` and ``3`` are ``"3"`` (as a CSV task names classes)."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)
