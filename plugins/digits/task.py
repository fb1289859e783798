"""scikit-learn's bundled 8x8 digits as tasks: few-shot episodes, and "is it a 3?".

* :class:`Digits`: N-way K-shot episodes. The 10 classes are split once, by the seed, into 5
  meta-train classes and 5 held-out classes; the held-out classes' images are split in
  half, one half for the meta-val episodes and the other for the meta-test episodes (same
  classes, disjoint images).
* :class:`DigitsVsRest`: the transfer setting of the classic "is it an airplane?" example:
  one target digit against the other nine, a binary target dataset split into
  train/val/test images (stratified by digit, so every part has every digit).

Nothing is downloaded: the data ships with scikit-learn.
"""

from __future__ import annotations

import torch
from torch import Tensor

from autometa import Float, Int
from autometa.datasets import FEW_SHOT_PARAMS, TARGET_PARAMS, FewShotTask, TargetTask
from autometa.episodes import ClassPool

N_TRAIN_CLASSES = 5


def load(device: torch.device) -> tuple[Tensor, Tensor]:
    """All 1,797 images, (n, 1, 8, 8) with pixels in [0, 1], and their digits (n,)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32, device=device) / 16.0
    return x.unsqueeze(1), torch.tensor(data.target, device=device)


class Digits(FewShotTask):
    input_shape = (1, 8, 8)
    params = {**FEW_SHOT_PARAMS, "ways": Int(2, 5), "shots": Int(1, 40),
              "queries": Int(1, 40)}

    def __init__(
        self,
        *,
        ways: int = 5,
        shots: int = 1,
        queries: int = 15,
        val_episodes: int = 200,
        test_episodes: int = 600,
        seed: int = 0,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__(ways=ways, shots=shots, queries=queries, val_episodes=val_episodes,
                         test_episodes=test_episodes, seed=seed, device=device)
        x, y = load(self.device)
        g = torch.Generator().manual_seed(seed)  # the split is drawn on the CPU: same everywhere
        classes = torch.randperm(10, generator=g).tolist()
        train, held_out = classes[:N_TRAIN_CLASSES], classes[N_TRAIN_CLASSES:]
        half = torch.rand(len(y), generator=g).to(self.device) < 0.5  # image -> val or test
        held = torch.isin(y, torch.tensor(held_out, device=self.device))
        self.set_pools(
            ClassPool(x, y, train, name="digits meta-train"),
            ClassPool(x[held & half], y[held & half], held_out, name="digits meta-val"),
            ClassPool(x[held & ~half], y[held & ~half], held_out, name="digits meta-test"),
        )


class DigitsVsRest(TargetTask):
    kind = "classification"
    params = {**TARGET_PARAMS, "target": Int(0, 9), "val_fraction": Float(0.05, 0.4),
              "test_fraction": Float(0.05, 0.4)}

    def __init__(
        self,
        *,
        target: int = 3,  # the digit to recognise (label 1); every other digit is label 0
        shots: int = 10,  # meta-train episodes: support images per label
        queries: int = 10,  # meta-train episodes: query images per label
        val_fraction: float = 0.2,  # images of each digit held out for validation
        test_fraction: float = 0.3,  # and for the test
        seed: int = 0,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__(shots=shots, queries=queries, val_fraction=val_fraction,
                         test_fraction=test_fraction, seed=seed, device=device)
        self.target = target
        x, digit = load(self.device)
        split = self.split(digit, name="digits-vs-rest")  # stratified by digit, not by label
        self.set_data(x, (digit == target).long(), split, name="digits-vs-rest",
                      class_names=(f"not {target}", str(target)))
