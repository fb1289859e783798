"""Nearest centroid: each query takes the class of its nearest support-class mean.

A class's centroid is the mean of its support features; a query's scores are its negative
squared Euclidean distances to the centroids. This is the inference of Prototypical
Networks (Snell, Swersky and Zemel 2017, arXiv:1703.05175, eq. 1-2) without their
meta-training, and SimpleShot's classifier (Wang, Chao, Weinberger and van der Maaten
2019, "SimpleShot: Revisiting Nearest-Neighbor Classification for Few-Shot Learning",
arXiv:1911.04623): nearest class mean on features that may be centred ("C") and
L2-normalised ("L2"; "CL2N" both). On the ``raw`` source it is nearest class mean on the
inputs themselves (scikit-learn's ``NearestCentroid``).

Deviation from SimpleShot: it centres with the mean feature of the meta-train (base)
classes; here ``center`` subtracts the mean of each episode's support features, which
needs no pass over the meta-train data and sees nothing of the query set.

Nothing is meta-trained (``meta_trains = False``: the engine skips meta-training): the
features are whatever the source model gives (the inputs for ``raw``, pre-trained ones
for ``pretrained`` or ``checkpoint``, random ones for a freshly initialised network).

Classes absent from an episode's support set (an N-way episode with N < ``output_size``)
get ``autometa.frozen.ABSENT_LOG_PROB`` and are never predicted.
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from autometa import Backbone, Categorical, Episodes, Task
from autometa.frozen import ABSENT_LOG_PROB, FrozenFeatureAlgorithm

Metric = Literal["euclidean", "cosine"]


class NearestCentroid(FrozenFeatureAlgorithm):
    def __init__(
        self,
        model: Backbone,
        task: Task,
        *,
        # "euclidean": squared Euclidean distance (ProtoNet); "cosine": the same on
        # L2-normalised features (SimpleShot's L2N)
        metric: Metric = "euclidean",
        center: bool = False,  # subtract the episode's mean support feature first (C)
    ) -> None:
        super().__init__(model, task)
        if metric not in ("euclidean", "cosine"):
            raise ValueError(f"nearest-centroid: unknown metric {metric!r}; expected "
                             "'euclidean' or 'cosine'")
        self.metric: Metric = metric
        self.center = center

    @classmethod
    def search_space(cls):
        return {"metric": Categorical(("euclidean", "cosine")),
                "center": Categorical((False, True))}

    def adapt_and_predict(self, episodes: Episodes) -> Tensor:
        """Log-probabilities (tasks, n_query, output_size): ``log_softmax`` of the negative
        squared distances over the episode's classes; absent classes get
        ``ABSENT_LOG_PROB``.

        Raises:
            FloatingPointError: a feature is NaN or infinite (the engine records the
                trial as diverged).
        """
        support, query = self.frozen_features(episodes)  # (tasks, n_s, d), (tasks, n_q, d)
        mean, centroids, present = self._centroids(support, episodes.support_y)
        return _scores(query, mean, centroids, present, self.metric).to(episodes.query_x.dtype)

    def adapted_module(self, support_x: Tensor, support_y: Tensor) -> nn.Module:
        """The features, and this support set's centroids (and mean, with ``center``) as
        buffers: a query set's log-probabilities, as :meth:`adapt_and_predict` gives."""
        support, _ = self.frozen_features(Episodes(support_x[None], support_y[None],
                                                   support_x[None], support_y[None]))
        mean, centroids, present = self._centroids(support, support_y[None])
        return _Centroids(copy.deepcopy(self.model.features).eval(), mean, centroids, present,
                          self.metric, support_x.dtype)

    def _centroids(self, support: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return _centroids(support, labels, self.task.output_size, self.center, self.metric)

    def adaptation_modules(self) -> tuple[nn.Module, nn.Module]:
        """A support set's mean feature, centroids and present classes (``adapt``), and the
        log-probabilities they give (``predict``)."""
        features = copy.deepcopy(self.model.features).eval()
        features.requires_grad_(False)
        return (_AdaptCentroids(features, self.task.output_size, self.center, self.metric),
                _PredictCentroids(features, self.metric))


def _centroids(support: Tensor, labels: Tensor, ways: int, center: bool, metric: Metric
               ) -> tuple[Tensor, Tensor, Tensor]:
    """The mean support feature (tasks, 1, d) (zeros unless ``center``), the class
    centroids (tasks, ways, d) of the centred (normalised) support features, and which
    classes the support set has (tasks, 1, ways)."""
    mean = support.mean(1, keepdim=True) if center else torch.zeros_like(support[:, :1])
    support = support - mean
    if metric == "cosine":
        support = F.normalize(support, dim=-1)
    onehot = F.one_hot(labels, ways).to(support.dtype)
    counts = onehot.sum(1)  # (tasks, ways): support examples per class
    centroids = onehot.transpose(1, 2) @ support / counts.clamp(min=1).unsqueeze(-1)
    return mean, centroids, (counts > 0).unsqueeze(1)


class _AdaptCentroids(nn.Module):
    """(n, *in), (n,) labels -> mean (1, 1, d), centroids (1, ways, d), present (1, 1, ways)."""

    def __init__(self, features: nn.Module, ways: int, center: bool, metric: Metric) -> None:
        super().__init__()
        self.features, self.ways, self.center, self.metric = features, ways, center, metric

    def forward(self, support_x: Tensor, support_y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        support = self.features(support_x).flatten(1).double()[None]  # as frozen_features
        return _centroids(support, support_y[None], self.ways, self.center, self.metric)


class _PredictCentroids(nn.Module):
    """(m, *in) and what :class:`_AdaptCentroids` gives -> log-probabilities (m, ways)."""

    def __init__(self, features: nn.Module, metric: Metric) -> None:
        super().__init__()
        self.features, self.metric = features, metric

    def forward(self, x: Tensor, mean: Tensor, centroids: Tensor, present: Tensor) -> Tensor:
        query = self.features(x).flatten(1).double()[None]
        return _scores(query, mean, centroids, present, self.metric)[0].to(x.dtype)


def _scores(query: Tensor, mean: Tensor, centroids: Tensor, present: Tensor,
            metric: Metric) -> Tensor:
    """Log-probabilities (tasks, n_q, output_size) of float64 features ``query``."""
    query = query - mean
    if metric == "cosine":
        query = F.normalize(query, dim=-1)
    # Exact differences, never |q|² - 2q·c + |c|² (cdist's faster mode loses digits).
    distance = torch.cdist(query, centroids, compute_mode="donot_use_mm_for_euclid_dist")
    logits = -distance.pow(2)  # (tasks, n_q, output_size)
    logits = logits.masked_fill(~present, float("-inf")).log_softmax(-1)
    return logits.masked_fill(~present, ABSENT_LOG_PROB)


class _Centroids(nn.Module):
    """Nearest centroid adapted to one support set: (n, *input_shape) -> log-probabilities
    (n, output_size)."""

    mean: Tensor
    centroids: Tensor
    present: Tensor

    def __init__(self, features: nn.Module, mean: Tensor, centroids: Tensor,
                 present: Tensor, metric: Metric, dtype: torch.dtype) -> None:
        super().__init__()
        self.features, self.metric, self.dtype = features, metric, dtype
        self.register_buffer("mean", mean.detach().clone())
        self.register_buffer("centroids", centroids.detach().clone())
        self.register_buffer("present", present.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        query = self.features(x).flatten(1).double()[None]  # (1, n, d), as frozen_features
        return _scores(query, self.mean, self.centroids, self.present, self.metric)[0] \
            .to(self.dtype)
