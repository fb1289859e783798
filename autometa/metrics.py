"""Metrics and losses, per task kind, and the confidence interval used by leaderboards."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch.nn.functional as F
from torch import Tensor

TaskKind = Literal["classification", "regression"]
Direction = Literal["minimize", "maximize"]


def mse_per_episode(pred: Tensor, target: Tensor) -> Tensor:
    """Mean squared error of each episode: (tasks, n, out), (tasks, n, out) -> (tasks,)."""
    return ((pred - target) ** 2).flatten(1).mean(1)


def accuracy_per_episode(logits: Tensor, target: Tensor) -> Tensor:
    """Accuracy of each episode: (tasks, n, classes), (tasks, n) -> (tasks,)."""
    return (logits.argmax(-1) == target).float().mean(1)


def mse_per_example(pred: Tensor, target: Tensor) -> Tensor:
    """Squared error of each query example: (tasks, n, out), (tasks, n, out) -> (tasks, n)."""
    return ((pred - target) ** 2).flatten(2).mean(2)


def accuracy_per_example(logits: Tensor, target: Tensor) -> Tensor:
    """1 per correctly classified query example: (tasks, n, classes), (tasks, n) -> (tasks, n)."""
    return (logits.argmax(-1) == target).float()


@dataclass(frozen=True)
class Metric:
    """How a task is scored: a name, a direction, and a per-episode function.

    ``per_example``, if given, scores each query example so that an episode's score is the
    mean of its examples' scores; it gives a confidence interval over the examples of a
    split that is a single episode (a target dataset's test split).
    """

    name: str
    direction: Direction
    per_episode: Callable[[Tensor, Tensor], Tensor] = field(compare=False, repr=False)
    per_example: Callable[[Tensor, Tensor], Tensor] | None = field(
        default=None, compare=False, repr=False)

    def __call__(self, pred: Tensor, target: Tensor) -> Tensor:
        return self.per_episode(pred, target)

    def better(self, a: float, b: float) -> bool:
        """True if score ``a`` is strictly better than ``b``."""
        return a < b if self.direction == "minimize" else a > b


MSE = Metric("mse", "minimize", mse_per_episode, mse_per_example)
ACCURACY = Metric("accuracy", "maximize", accuracy_per_episode, accuracy_per_example)


def loss_for(kind: TaskKind, pred: Tensor, target: Tensor) -> Tensor:
    """The training loss of a task kind, averaged over every leading dimension.

    Regression: MSE on (..., out). Classification: cross-entropy on logits (..., classes)
    against integer labels (...).
    """
    if kind == "regression":
        return F.mse_loss(pred, target)
    return F.cross_entropy(pred.reshape(-1, pred.shape[-1]), target.reshape(-1))


def mean_ci95(scores: Tensor) -> tuple[float, float]:
    """Mean and half-width of the 95% confidence interval (Student's t) over episodes."""
    from scipy.stats import t  # scipy comes with scikit-learn

    x = scores.detach().double().cpu()
    n = x.numel()
    mean = float(x.mean())
    if n < 2:
        return mean, math.nan
    half = float(t.ppf(0.975, n - 1)) * float(x.std(unbiased=True)) / math.sqrt(n)
    return mean, half
