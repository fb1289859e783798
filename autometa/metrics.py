"""Metrics and losses, per task kind, and the confidence interval used by leaderboards."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from autometa.intervals import student_t

__all__ = [
    "ACCURACY",
    "Direction",
    "EPISODE_ACCURACY",
    "MSE",
    "Metric",
    "TaskKind",
    "accuracy_per_episode",
    "accuracy_per_example",
    "episode_loss",
    "loss_for",
    "mask_absent",
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
    split that is a single episode (a target dataset's test split). ``binary``: those
    per-example scores are 0/1 outcomes (accuracy), so that interval is a binomial one
    (Wilson's, :func:`autometa.intervals.interval_of`) rather than Student's t.
    """

    name: str
    direction: Direction
    per_episode: Callable[[Tensor, Tensor], Tensor] = field(compare=False, repr=False)
    per_example: Callable[[Tensor, Tensor], Tensor] | None = field(
        default=None, compare=False, repr=False)
    binary: bool = field(default=False, compare=False)

    def __call__(self, pred: Tensor, target: Tensor) -> Tensor:
        return self.per_episode(pred, target)

    def better(self, a: float, b: float) -> bool:
        """True if score ``a`` is strictly better than ``b``."""
        return a < b if self.direction == "minimize" else a > b


MSE = Metric("mse", "minimize", mse_per_episode, mse_per_example)
ACCURACY = Metric("accuracy", "maximize", accuracy_per_episode, accuracy_per_example,
                  binary=True)


def loss_for(kind: TaskKind, pred: Tensor, target: Tensor) -> Tensor:
    """The training loss of a task kind, averaged over every leading dimension.

    Regression: MSE on (..., out). Classification: cross-entropy on logits (..., classes)
    against integer labels (...).
    """
    if kind == "regression":
        return F.mse_loss(pred, target)
    return F.cross_entropy(pred.reshape(-1, pred.shape[-1]), target.reshape(-1))


def mask_absent(logits: Tensor, target: Tensor) -> Tensor:
    """``logits`` with every class absent from ``target`` set to the dtype's lowest value:
    never the argmax, no probability, no gradient (``masked_fill`` passes none to them).

    For episodes of differing ways under one ``output_size`` (an N-way episode's labels are
    0..N-1, the logits N.. belong to no class of it: Meta-Album's any-way episodes, Ullah
    et al., NeurIPS 2022), where every class of an episode appears in its ``target`` (its
    support set's labels, or its query set's). Built by ``scatter`` with no data-dependent
    branch, so it runs under ``torch.func.grad`` and ``vmap``.

    Shapes: ``logits`` (..., n, classes), ``target`` (..., n) int64; the mask is per leading
    index (per episode), over its ``n`` examples. Returns the shape of ``logits``.
    """
    present = torch.zeros(*target.shape[:-1], logits.shape[-1], dtype=logits.dtype,
                          device=logits.device).scatter(-1, target, 1.0)  # (..., classes)
    return logits.masked_fill(present.unsqueeze(-2) == 0, torch.finfo(logits.dtype).min)


def episode_loss(logits: Tensor, target: Tensor) -> Tensor:
    """Cross-entropy over each episode's own classes (:func:`mask_absent`), averaged over
    every leading dimension: (..., n, classes), (..., n) -> ()."""
    return loss_for("classification", mask_absent(logits, target), target)


#: Accuracy over each episode's own classes (:func:`mask_absent` by the query labels): the
#: argmax never picks a class outside the episode. Equal to :data:`ACCURACY` wherever an
#: episode's queries hold every class of the output.
EPISODE_ACCURACY = Metric(
    "accuracy", "maximize",
    lambda logits, target: accuracy_per_episode(mask_absent(logits, target), target),
    lambda logits, target: accuracy_per_example(mask_absent(logits, target), target),
    binary=True)


def mean_ci95(scores: Tensor) -> tuple[float, float]:
    """Mean and half-width of the 95% confidence interval (Student's t) over episodes
    (:func:`autometa.intervals.student_t`)."""
    interval = student_t(scores.detach().double().cpu().tolist())
    return interval.mean, interval.half_width


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
