"""scikit-learn's bundled tabular datasets as target tasks: iris, wine, breast cancer.

Each is a :class:`~autometa.datasets.TargetTask`: a seeded, stratified train/val/test split
of the examples; features standardised with the mean and deviation of the train split
only (``StandardScaler`` fitted on it), so nothing of the val or test split leaks into
training. Nothing is downloaded: the data ships with scikit-learn.

| task | examples | features | classes |
|---|---|---|---|
| iris | 150 | 4 | 3 |
| wine | 178 | 13 | 3 |
| breast-cancer | 569 | 30 | 2 |
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from autometa.datasets import TargetTask
from autometa.task import InputBatch


class SklearnDataset(TargetTask):
    """A bundled scikit-learn classification dataset; subclasses name the loader."""

    kind = "classification"
    name: str
    loader: Callable[[], Any]

    def __init__(
        self,
        *,
        shots: int = 5,  # meta-train episodes: support examples per class
        queries: int = 5,  # meta-train episodes: query examples per class
        val_fraction: float = 0.2,  # examples of each class held out for validation
        test_fraction: float = 0.3,  # and for the test
        seed: int = 0,
        device: torch.device | str = "cpu",
    ) -> None:
        from sklearn.preprocessing import StandardScaler

        super().__init__(shots=shots, queries=queries, val_fraction=val_fraction,
                         test_fraction=test_fraction, seed=seed, device=device)
        data = type(self).loader()
        y = torch.as_tensor(data.target).long()
        split = self.split(y, name=self.name)
        scaler = StandardScaler().fit(data.data[split[0].numpy()])  # the train split only
        x = torch.as_tensor(scaler.transform(data.data), dtype=torch.float32)
        self.scaler = scaler
        self.feature_names = [str(f) for f in data.feature_names]
        self.set_data(x, y, split, name=self.name, class_names=list(data.target_names))

    def read_inputs(self, path: Path, *, labelled: bool) -> InputBatch:
        """Rows of raw features (a CSV of numbers, one column per feature in the dataset's
        order, :attr:`feature_names`; a support file adds a ``label`` column of class
        names), standardised like the task's own examples (the train split's scaler)."""
        batch = super().read_inputs(path, labelled=labelled)
        x = torch.as_tensor(self.scaler.transform(batch.x.double().numpy()),
                            dtype=torch.float32)
        return replace(batch, x=x)


def _loader(name: str) -> Callable[[], Any]:
    def load() -> Any:
        import sklearn.datasets

        return getattr(sklearn.datasets, name)()

    return load


class Iris(SklearnDataset):
    name = "iris"
    loader = staticmethod(_loader("load_iris"))


class Wine(SklearnDataset):
    name = "wine"
    loader = staticmethod(_loader("load_wine"))


class BreastCancer(SklearnDataset):
    name = "breast-cancer"
    loader = staticmethod(_loader("load_breast_cancer"))
