"""New rows for a built CSV task (:meth:`CSVTask.read_inputs`, used by ``autometa predict``).

A CSV with the task's feature columns, in any order; its label (target) column is
optional and ignored, except in a support file, which needs it. The rows are encoded by
the task's fitted preprocessor (standardised numbers, one-hot text), exactly as its own
rows were. Messages name the ``autometa predict`` option the file came with.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd
import torch

from autometa import DataError
from autometa.task import InputBatch
from autometa_plugins.csvfile.columns import class_name, is_number, read_csv

log = logging.getLogger(__name__)


class Encoding(Protocol):
    """What reading new rows needs of a built :class:`~autometa_plugins.csvfile.task.CSVTask`
    (a protocol: the task imports this module, never the other way round)."""

    features: list[str]  # the feature columns, in the order the preprocessor takes them
    target: str  # the label (target) column
    kind: str  # "classification" or "regression"
    preprocessor: Any  # the fitted sklearn ColumnTransformer ("numeric", "categorical")


def read_rows(task: Encoding, path: Path, *, labelled: bool) -> InputBatch:
    """The rows of the CSV file at ``path`` encoded for ``task`` (see the module docstring).

    Raises:
        DataError: ``path`` is a folder or not a readable CSV; its columns are not the
            task's features (and, if ``labelled``, its target); a cell is missing or not a
            number where the task read numbers; a support row has no label.
    """
    flag = "--support" if labelled else "--input"
    if path.is_dir():
        raise DataError(f"{flag} {str(path)!r} is a folder; this study's task reads a CSV "
                        "file of feature rows")
    frame = read_csv(path, f"{flag} {str(path)!r}")
    columns = [str(c) for c in frame.columns]
    features, target = list(task.features), task.target
    missing = [c for c in features if c not in columns]
    extra = [c for c in columns if c not in features and c != target]
    if missing or extra or (labelled and target not in columns):
        problems = [f"missing {missing}" if missing else "", f"unexpected {extra}" if extra
                    else "", f"no label column {target!r}" if labelled and target not in
                    columns else ""]
        label = (f"and the label column {target!r}" if labelled else
                 f"(the label column {target!r} is optional)")
        raise DataError(f"{flag}: the columns do not match the study's CSV task "
                        f"({'; '.join(p for p in problems if p)}); give the feature columns "
                        f"{features} {label}")
    numeric = set(dict((n, c) for n, _, c in task.preprocessor.transformers_)["numeric"])
    encoded = {}
    for column in features:
        values = frame[column]
        bad = values.isna()
        if column in numeric:
            parsed = pd.to_numeric(values.astype(str).str.strip(), errors="coerce")
            parsed[values.isna()] = np.nan
            bad = parsed.isna() | ~np.isfinite(parsed.to_numpy(float))
            encoded[column] = parsed.astype(float)
        else:
            encoded[column] = values.astype(str)
        if bool(bad.any()):
            row = int(np.flatnonzero(bad.to_numpy())[0])
            what = "a number" if column in numeric else "a value"
            raise DataError(f"{flag}: column {column!r} needs {what} in every row (the study "
                            f"read it as {'numbers' if column in numeric else 'text'}); row "
                            f"{row + 1} holds {str(values.iloc[row])!r}; fill it in or drop "
                            "the row")
    _warn_unseen(task, encoded, flag)
    x = torch.as_tensor(task.preprocessor.transform(pd.DataFrame(encoded)[features]),
                        dtype=torch.float32)  # (n, encoded features)
    labels: list[Any] | None = None
    if labelled:
        y = frame[target]
        if y.isna().any():
            raise DataError(f"{flag}: label column {target!r} is empty in row "
                            f"{int(np.flatnonzero(y.isna().to_numpy())[0]) + 1}; label "
                            "every support row")
        labels = (y.to_numpy(float).tolist() if task.kind == "regression" else
                  [class_name(v) for v in (y.to_numpy(float) if is_number(y) else
                                            y.astype(str))])
    return InputBatch(x, labels, list(range(len(frame))), "row")


def _warn_unseen(task: Encoding, encoded: dict[str, Any], flag: str) -> None:
    """Warn (once per column) about text values the study never saw: the one-hot encoder
    encodes them as none of its categories (``handle_unknown="ignore"``), so the model
    predicts from the other columns alone."""
    named = {name: (encoder, columns) for name, encoder, columns in
             task.preprocessor.transformers_}
    if "categorical" not in named:
        return
    encoder, columns = named["categorical"]
    if not len(columns) or not hasattr(encoder, "categories_"):  # no text column
        return
    for column, known in zip(columns, encoder.categories_, strict=True):
        unseen = sorted(set(encoded[column]) - {str(k) for k in known})
        if unseen:
            log.warning("%s: column %r holds %s, never seen in the study's data (it knows "
                        "%s); encoded as none of them", flag, column,
                        ", ".join(map(repr, unseen[:3])) + (" ..." if len(unseen) > 3 else ""),
                        ", ".join(map(repr, map(str, known[:5]))))
