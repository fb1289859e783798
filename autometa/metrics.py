"""Metrics and losses, per task kind, and the confidence interval used by leaderboards."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "ACCURACY",
    "Direction",
    "MSE",
    "Metric",
    "TaskKind",
    "accuracy_per_episode",
    "accuracy_per_example",
    "loss_for",
    "mse_per_episode",
    "mse_per_example",
]

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


#: Significance level of the paired tests that group trials into ties.
TIE_ALPHA = 0.05


def tie_groups(scores: list[list[float]], alpha: float = TIE_ALPHA
               ) -> tuple[list[int], list[float]]:
    """Group ranked models whose paired meta-test scores cannot be told apart.

    ``scores[i]`` holds model ``i``'s scores on the same episodes (or examples) as every
    other model's, models in rank order (best first). Walking the ranking, the first model
    not yet grouped leads a new group; each later ungrouped model is compared with it by a
    two-sided Wilcoxon signed-rank test on the paired differences (Wilcoxon 1945; scipy),
    the p-values of one leader's comparisons Holm-corrected (Holm 1979; statsmodels), and
    those with an adjusted p-value ≥ ``alpha`` join its group. Group 1 is therefore "tied
    with the best".

    A pair with fewer than two scores, a different number of scores, or no difference at
    all is a tie (p = 1): nothing tells them apart.

    Returns:
        (group per model, numbered from 1; each model's adjusted p-value against the best,
        NaN for the best itself).
    """
    import numpy as np
    from scipy.stats import wilcoxon
    from statsmodels.stats.multitest import multipletests

    n = len(scores)
    groups = [0] * n
    pvalues = [math.nan] * n
    group = 0
    for leader in range(n):
        if groups[leader]:
            continue
        group += 1
        groups[leader] = group
        others = [i for i in range(leader + 1, n) if not groups[i]]
        raw = []
        for i in others:
            a, b = np.asarray(scores[leader]), np.asarray(scores[i])
            if len(a) < 2 or len(a) != len(b) or not np.any(a != b):
                raw.append(1.0)
            else:
                raw.append(float(wilcoxon(a, b, alternative="two-sided").pvalue))
        if not others:
            continue
        adjusted = multipletests(raw, alpha=alpha, method="holm")[1]
        for i, p in zip(others, adjusted, strict=True):
            if leader == 0:
                pvalues[i] = float(p)
            if p >= alpha:
                groups[i] = group
    return groups, pvalues
