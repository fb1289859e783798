"""A user's local CSV file as a task: classification or regression on one target column.

The file is read with pandas (a header row of column names, then one row per example).
``target`` names the column to predict; ``features`` the columns to predict it from
(default: every other column). One task, two shapes of episodes (``episodes``):

* ``"split"`` (default): a :class:`~autometa.datasets.TargetTask`. The rows are split
  once, by the seed, into train/val/test rows (stratified by class for classification);
  meta-val is one episode (adapt on the train rows, score the val rows), meta-test likewise
  with the test rows, so the leaderboard's interval is over test examples. Meta-train
  episodes come from the train rows: ``shots`` + ``queries`` rows of every class
  (classification) or of the whole train split (regression).
* ``"few-shot"`` (classification only): a :class:`~autometa.datasets.FewShotTask`. The
  target's classes are split once, by the seed, into disjoint meta-train, meta-val and
  meta-test classes; episodes are ``ways``-way ``shots``-shot with ``queries`` query rows
  per class. Meta-val gets ``val_classes`` classes, or if that is 0
  ``max(ways, round(val_fraction * classes))``; meta-test likewise; meta-train the rest.

Rules, checked once when the task is built, each failure one :class:`~autometa.DataError`
naming the file, the column and the value:

* **Duplicate column names** (``a,label,label``) are refused, naming the column and its
  positions: pandas would rename the second ``label.1`` and silently use it as a feature
  (the target leaking into the features). The header is read with the ``csv`` module.
* **kind="auto"**: classification if the target column is text or boolean, or numeric with
  only integer values (``3.0`` counts) and at most ``AUTO_MAX_CLASSES`` (20) distinct ones;
  regression otherwise. Pass ``kind`` to decide yourself.
* **Mixed types**: a column that pandas could not read as numbers is text. If more than half
  of its filled cells parse as numbers but not all (``1, 2, x, 4``), it is refused, naming
  the column and the first non-numeric cell (a typo, or a missing-value marker such as
  ``?``: leave missing cells empty); with half or fewer numeric cells it is a text
  (categorical) column.
* **Missing values** (empty cells, ``NA``, ``NaN``) and infinities are refused in the
  target and in the features, never imputed: the message names the columns and the rows.
* **Features**: numeric columns are standardised (``StandardScaler``); text, category and
  boolean columns are one-hot encoded (``OneHotEncoder(handle_unknown="ignore")``: a value
  never seen in training encodes as all zeros). Both are fitted on the training rows only
  (the train split, or the meta-train classes' rows) and then applied to every row.
* **Classification labels**: the target's distinct values in sorted order are labels
  ``0..C-1``; ``class_names`` keeps the values.
* **Regression targets** are standardised with the train split's mean and standard
  deviation, so the MSE is in **standardised target units** (predicting the train mean
  scores about 1). Multiply by ``target_std ** 2`` (``describe()["target_scaling"]``) for
  the target's own units.

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

from autometa import Categorical, ConfigError, DataError, Int
from autometa.datasets import (
    FEW_SHOT_PARAMS,
    TARGET_PARAMS,
    FewShotTask,
    InnerTask,
    TargetTask,
    split_classes,
)
from autometa.episodes import ClassPool
from autometa.errors import unknown
from autometa.numeric_inputs import read_frame
from autometa.task import InputBatch, Task

log = logging.getLogger(__name__)

#: kind="auto": an integer-valued numeric target with at most this many values is classes.
AUTO_MAX_CLASSES = 20
#: A text column with more than this share of number-like cells is a mixed-types error.
MIXED_NUMERIC_SHARE = 0.5
KINDS = ("auto", "classification", "regression")
EPISODES = ("split", "few-shot")


class CSVTask(InnerTask):
    """A CSV file's target column as a task (see the module docstring for every rule).

    The engine sees one class whatever ``episodes`` is: the data are read and encoded here,
    then held by an inner :class:`TargetTask` or :class:`FewShotTask` to which the episode
    methods are forwarded.

    Attributes (after building): ``class_names`` (classification), ``feature_names`` (the
    encoded features), ``rows`` (row positions of the train/val/test parts, from 0),
    ``preprocessor`` (the fitted ``ColumnTransformer``), ``target_mean`` and
    ``target_std`` (regression).
    """

    params = {
        "kind": Categorical(KINDS),
        "episodes": Categorical(EPISODES),
        **TARGET_PARAMS,  # shots, queries, val_fraction, test_fraction
        "ways": FEW_SHOT_PARAMS["ways"],
        "val_episodes": FEW_SHOT_PARAMS["val_episodes"],
        "test_episodes": FEW_SHOT_PARAMS["test_episodes"],
        "val_classes": Int(0, 100_000),
        "test_classes": Int(0, 100_000),
    }

    def __init__(
        self,
        *,
        path: str | os.PathLike[str] | None = None,  # the CSV file (required)
        target: str | None = None,  # the column to predict (required)
        features: Sequence[str] | str | None = None,  # columns (or "a,b"); default: the rest
        kind: str = "auto",  # "auto", "classification" or "regression"
        episodes: str = "split",  # "split" (train/val/test rows) or "few-shot" (class split)
        shots: int = 5,  # meta-train support rows per class (regression: in all)
        queries: int = 5,  # query rows per class (regression: in all)
        val_fraction: float = 0.2,  # rows (split) or classes (few-shot) held out for meta-val
        test_fraction: float = 0.2,  # and for meta-test
        ways: int = 5,  # few-shot: classes per episode
        val_episodes: int = 100,  # few-shot: fixed meta-val episodes
        test_episodes: int = 600,  # few-shot: fixed meta-test episodes
        val_classes: int = 0,  # few-shot: meta-val classes (0: from val_fraction)
        test_classes: int = 0,  # few-shot: meta-test classes (0: from test_fraction)
        seed: int = 0,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__(seed=seed, device=device)
        for key, value, choices in (("kind", kind, KINDS), ("episodes", episodes, EPISODES)):
            if value not in choices:
                raise ConfigError(f"task csv: {key}={value!r} is not one of {list(choices)}")
        if path is None or path == "" or target is None or target == "":
            key = "path" if path is None or path == "" else "target"
            raise ConfigError(f"task csv needs {key}=...; pass it with --task-param "
                              f"{key}=... or task_params={{{key!r}: ...}}")
        self.path, self.target, self.episodes = Path(path), str(target), episodes
        self.name = name = f"csv file {str(path)!r}"
        frame = read_csv(self.path, name)
        self.features = _feature_columns(frame, self.target, features, name)
        columns = {c: _numbers_or_text(frame[c], c, name) for c in [self.target, *self.features]}
        y_raw = columns.pop(self.target)
        _check_target_present(y_raw, self.target, name)
        _check_features_present(columns, name)
        self.kind = infer_kind(y_raw) if kind == "auto" else kind  # type: ignore[assignment]
        if self.kind == "regression" and not _is_number(y_raw):
            raise DataError(f"{name}: target column {self.target!r} holds text (e.g. "
                            f"{str(y_raw.iloc[0])!r}); regression needs numbers; use "
                            "kind='classification'")
        x_frame = pd.DataFrame({c: s.astype(float) if _is_number(s) else s.astype(str)
                                for c, s in columns.items()})
        self.target_mean: float | None = None
        self.target_std: float | None = None
        self.class_names: list[str] = []
        if self.kind == "classification":
            labels = self._labels(y_raw)
            if episodes == "few-shot":
                inner: Task = self._few_shot(x_frame, labels, ways, shots, queries,
                                                   val_fraction, test_fraction, val_episodes,
                                                   test_episodes, val_classes, test_classes)
            else:
                inner = self._split(x_frame, labels, shots, queries, val_fraction,
                                          test_fraction)
        else:
            if episodes == "few-shot":
                raise DataError(
                    f"{name}: episodes='few-shot' needs classes, but target column "
                    f"{self.target!r} is read as regression (kind={kind!r}); use "
                    "episodes='split', or kind='classification' if its values are classes")
            inner = self._split(x_frame, torch.tensor(y_raw.to_numpy(float)), shots,
                                      queries, val_fraction, test_fraction)
        self.use(inner)
        _warn_wide_categoricals(x_frame, name)

    # -- building ------------------------------------------------------------------------
    def _labels(self, y: pd.Series) -> Tensor:
        """Sorted distinct values -> labels 0..C-1 (long); sets ``class_names``."""
        values = y.to_numpy(float) if _is_number(y) else y.astype(str).to_numpy(object)
        classes, labels = np.unique(values, return_inverse=True)
        self.class_names = [_class_name(c) for c in classes]
        if len(classes) < 2:
            raise DataError(f"{self.name}: target column {self.target!r} holds one class "
                            f"({self.class_names[0]!r}) in all {len(y)} rows; classification "
                            "needs at least 2 (or use kind='regression' for numbers)")
        return torch.as_tensor(labels.reshape(-1)).long()

    def _fit_features(self, frame: pd.DataFrame, train_rows: np.ndarray) -> Tensor:
        """Fit the encoding on ``train_rows`` and encode every row: (n, features) float32."""
        from sklearn.compose import ColumnTransformer
        from sklearn.preprocessing import OneHotEncoder, StandardScaler

        numeric = [c for c in frame.columns if is_numeric_dtype(frame[c])]
        text = [c for c in frame.columns if c not in numeric]
        self.preprocessor = ColumnTransformer(
            [("numeric", StandardScaler(), numeric),
             ("categorical", OneHotEncoder(handle_unknown="ignore", sparse_output=False), text)],
            sparse_threshold=0.0,
        ).fit(frame.iloc[train_rows])
        self.feature_names = [str(n) for n in self.preprocessor.get_feature_names_out()]
        return torch.as_tensor(self.preprocessor.transform(frame), dtype=torch.float32)

    def _split(self, frame: pd.DataFrame, y: Tensor, shots: int, queries: int,
               val_fraction: float, test_fraction: float) -> TargetTask:
        inner = TargetTask(shots=shots, queries=queries, val_fraction=val_fraction,
                           test_fraction=test_fraction, seed=self.seed, device=self.device)
        inner.kind = self.kind
        need = shots + queries
        if self.kind == "classification":
            counts = torch.bincount(y, minlength=len(self.class_names))
            smallest = int(counts.argmin())
            if counts[smallest] < 3:
                raise DataError(
                    f"{self.name}: class {self.class_names[smallest]!r} of target "
                    f"{self.target!r} has {int(counts[smallest])} row(s); a train/val/test "
                    "split needs at least 3 per class; add rows of that class or drop them")
        elif len(y) < 3:
            raise DataError(f"{self.name}: {len(y)} row(s) are too few for a train/val/test "
                            "split, which needs at least 3; add rows")
        split = inner.split(y, name=self.name)
        train = split[0].numpy()
        self.rows = dict(zip(("train", "val", "test"), (s.numpy() for s in split),
                             strict=True))
        if self.kind == "classification":
            counts = torch.bincount(y[split[0]], minlength=len(self.class_names))
            smallest = int(counts.argmin())
            if counts[smallest] < need:
                raise DataError(
                    f"{self.name}: class {self.class_names[smallest]!r} has "
                    f"{int(counts[smallest])} row(s) in the train split, fewer than shots + "
                    f"queries = {need} for meta-train episodes; lower 'shots' or 'queries', "
                    "or add rows")
        else:
            if len(train) < need:
                raise DataError(
                    f"{self.name}: the train split has {len(train)} of {len(y)} rows, fewer "
                    f"than shots + queries = {need} for meta-train episodes; lower 'shots' "
                    "or 'queries', or add rows")
            self.target_mean = float(y[split[0]].double().mean())
            self.target_std = float(y[split[0]].double().std(unbiased=False))
            if not self.target_std > 0:
                raise DataError(f"{self.name}: target column {self.target!r} has one value "
                                f"({self.target_mean:g}) in all train rows; regression needs "
                                "a target that varies")
            y = (y.double() - self.target_mean) / self.target_std
        x = self._fit_features(frame, train)
        inner.set_data(x, y, split, name=self.name, class_names=self.class_names)
        return inner

    def _few_shot(self, frame: pd.DataFrame, y: Tensor, ways: int, shots: int, queries: int,
                  val_fraction: float, test_fraction: float, val_episodes: int,
                  test_episodes: int, val_classes: int, test_classes: int) -> FewShotTask:
        n_classes, need = len(self.class_names), shots + queries
        if n_classes < 3 * ways:
            raise DataError(
                f"{self.name}: {ways}-way episodes over disjoint meta-train, meta-val and "
                f"meta-test classes need at least 3 x {ways} = {3 * ways} classes; target "
                f"{self.target!r} has {n_classes}; lower 'ways' or use episodes='split'")
        sizes = []
        for key, fixed, fraction in (("val_classes", val_classes, val_fraction),
                                     ("test_classes", test_classes, test_fraction)):
            if 0 < fixed < ways:
                raise ConfigError(f"task csv: {key}={fixed} is fewer than ways={ways}; "
                                  f"set {key} >= {ways}, or 0 to use the fraction")
            sizes.append(fixed or max(ways, round(fraction * n_classes)))
        n_train = n_classes - sum(sizes)
        if n_train < ways:
            raise DataError(
                f"{self.name}: {sizes[0]} meta-val + {sizes[1]} meta-test classes leave "
                f"{max(n_train, 0)} of {n_classes} for meta-train, fewer than ways={ways}; "
                "lower val_classes/test_classes (or the fractions) or 'ways'")
        counts = torch.bincount(y, minlength=n_classes)
        smallest = int(counts.argmin())
        if counts[smallest] < need:
            raise DataError(
                f"{self.name}: class {self.class_names[smallest]!r} has "
                f"{int(counts[smallest])} row(s), fewer than shots + queries = {need}; lower "
                "'shots' or 'queries', or drop that class's rows")
        groups = split_classes(list(range(n_classes)), [n_train, *sizes], self.seed,
                               name=self.name)
        self.rows = {part: np.flatnonzero(np.isin(y.numpy(), group))
                     for part, group in zip(("train", "val", "test"), groups, strict=True)}
        self.classes = {part: [self.class_names[c] for c in group]
                        for part, group in zip(("train", "val", "test"), groups, strict=True)}
        x = self._fit_features(frame, self.rows["train"]).to(self.device)
        inner = FewShotTask(ways=ways, shots=shots, queries=queries,
                            val_episodes=val_episodes, test_episodes=test_episodes,
                            seed=self.seed, device=self.device)
        inner.input_shape = tuple(x.shape[1:])
        y = y.to(self.device)
        inner.set_pools(*(ClassPool(x, y, group, name=f"{self.name} meta-{part}")
                          for part, group in zip(("train", "val", "test"), groups, strict=True)))
        return inner

    def read_inputs(self, path: Path, *, labelled: bool) -> InputBatch:
        """Rows of a CSV with this task's feature columns, encoded by its preprocessor
        (:mod:`autometa_plugins.csvfile.inputs`)."""
        from autometa_plugins.csvfile.inputs import read_rows

        return read_rows(self, path, labelled=labelled)

    def describe(self) -> dict[str, Any]:
        info: dict[str, Any] = {
            **super().describe(),
            "file": str(self.path),
            "target": self.target,
            "features": list(self.features),
            "encoded_features": len(self.feature_names),
            "episodes": self.episodes,
        }
        if self.kind == "classification":
            info["class_names"] = self.class_names
        if self.episodes == "few-shot":
            info["classes"] = self.classes
            info["rows"] = {part: len(rows) for part, rows in self.rows.items()}
        if self.target_std is not None:
            info["target_scaling"] = {
                "mean": self.target_mean, "std": self.target_std,
                "mse_units": "standardised target (multiply by std**2 for the target's units)",
            }
        return info


def read_csv(path: Path, name: str) -> pd.DataFrame:
    """The file's rows; one DataError if it is missing, unreadable, empty or has no rows."""
    if not path.exists():
        where = "" if path.is_absolute() else f" (relative to the working directory {os.getcwd()})"
        raise DataError(f"{name} does not exist{where}; pass the path of an existing CSV file")
    if path.is_dir():
        raise DataError(f"{name} is a directory; expected a CSV file")
    frame = read_frame(path, name)
    _check_unique_columns(path, name)
    return frame


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
    if not _is_number(y):  # text or booleans
        return "classification"
    values = y.to_numpy(float)
    if np.all(values == np.round(values)) and len(np.unique(values)) <= AUTO_MAX_CLASSES:
        return "classification"
    return "regression"


def _feature_columns(frame: pd.DataFrame, target: str, features: Sequence[str] | str | None,
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


def _is_number(s: pd.Series) -> bool:
    return is_numeric_dtype(s) and not is_bool_dtype(s)


def _row(index: Any) -> int:
    """1-based data row of a default (RangeIndex) label."""
    return int(index) + 1


def _numbers_or_text(s: pd.Series, column: str, name: str) -> pd.Series:
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
    if _is_number(s):
        bad |= ~np.isfinite(s.to_numpy(float))
    return bad


def _check_target_present(y: pd.Series, target: str, name: str) -> None:
    bad = _missing(y)
    if bool(bad.any()):
        raise DataError(
            f"{name}: target column {target!r} is missing (empty, NA) or infinite in "
            f"{int(bad.sum())} of {len(y)} rows (first: row {_row(bad.idxmax())}); fill in "
            "or drop those rows")


def _check_features_present(columns: dict[str, pd.Series], name: str) -> None:
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


def _class_name(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _warn_wide_categoricals(frame: pd.DataFrame, name: str) -> None:
    """An identifier-like text column (a value per row) one-hot encodes to noise; say so."""
    for column in frame.columns:
        if not is_numeric_dtype(frame[column]):
            distinct = frame[column].nunique()
            if distinct > 50 and distinct > len(frame) // 2:
                log.warning("%s: text column %r has %d distinct values in %d rows, one-hot "
                            "encoded as as many features; leave it out of features if it is "
                            "an identifier", name, column, distinct, len(frame))
