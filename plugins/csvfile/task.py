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

Your own split instead of the fractions (``episodes="split"``): ``split_column`` names a
column whose value in each row is ``train``, ``val`` or ``test``; it is never a feature.
The fractions' limits otherwise: each in [0.05, 0.5], their sum below 0.9, at least one
row of every class in each part.

Rules, checked once when the task is built, each failure one :class:`~autometa.DataError`
naming the file, the column and the value:

* **Duplicate column names** (``a,label,label``) are refused, naming the column and its
  positions: pandas would rename the second ``label.1`` and silently use it as a feature
  (the target leaking into the features). The header is read with the ``csv`` module.
* **kind="auto"**: classification if the target column is text or boolean, or numeric with
  only integer values (``3.0`` counts) and at most ``columns.AUTO_MAX_CLASSES`` (20) distinct ones;
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

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from pandas.api.types import is_numeric_dtype
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
from autometa.task import InputBatch, Task
from autometa_plugins.csvfile.columns import (
    check_features_present,
    check_target_present,
    class_name,
    feature_columns,
    infer_kind,
    is_number,
    numbers_or_text,
    read_csv,
    split_rows,
    warn_wide_categoricals,
)
from autometa_plugins.csvfile.inputs import read_rows

log = logging.getLogger(__name__)

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
        split_column: str | None = None,  # split: a column of train/val/test per row
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
        self.split_rows = None if split_column is None else \
            split_rows(frame, split_column, episodes, name)
        if split_column is not None and features is None:
            frame = frame.drop(columns=[split_column])  # never a feature
        self.features = feature_columns(frame, self.target, features, name)
        if split_column in self.features:
            raise ConfigError(f"{name}: column {split_column!r} is the split_column; remove "
                              "it from features")
        columns = {c: numbers_or_text(frame[c], c, name) for c in [self.target, *self.features]}
        y_raw = columns.pop(self.target)
        check_target_present(y_raw, self.target, name)
        check_features_present(columns, name)
        self.kind = infer_kind(y_raw) if kind == "auto" else kind  # type: ignore[assignment]
        if self.kind == "regression" and not is_number(y_raw):
            raise DataError(f"{name}: target column {self.target!r} holds text (e.g. "
                            f"{str(y_raw.iloc[0])!r}); regression needs numbers; use "
                            "kind='classification'")
        x_frame = pd.DataFrame({c: s.astype(float) if is_number(s) else s.astype(str)
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
        warn_wide_categoricals(x_frame, name)

    # -- building ------------------------------------------------------------------------
    def _labels(self, y: pd.Series) -> Tensor:
        """Sorted distinct values -> labels 0..C-1 (long); sets ``class_names``."""
        values = y.to_numpy(float) if is_number(y) else y.astype(str).to_numpy(object)
        classes, labels = np.unique(values, return_inverse=True)
        self.class_names = [class_name(c) for c in classes]
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
        split = inner.split(y, name=self.name) if self.split_rows is None else \
            self.split_rows
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
