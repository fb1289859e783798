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

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

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
        if self.center:
            mean = support.mean(1, keepdim=True)  # (tasks, 1, d)
            support, query = support - mean, query - mean
        if self.metric == "cosine":
            support, query = F.normalize(support, dim=-1), F.normalize(query, dim=-1)
        onehot = F.one_hot(episodes.support_y, self.task.output_size).to(support.dtype)
        counts = onehot.sum(1)  # (tasks, output_size): support examples per class
        centroids = onehot.transpose(1, 2) @ support / counts.clamp(min=1).unsqueeze(-1)
        # Exact differences, never |q|² - 2q·c + |c|² (cdist's faster mode loses digits).
        distance = torch.cdist(query, centroids, compute_mode="donot_use_mm_for_euclid_dist")
        logits = -distance.pow(2)  # (tasks, n_q, output_size)
        present = (counts > 0).unsqueeze(1)  # (tasks, 1, output_size)
        logits = logits.masked_fill(~present, float("-inf")).log_softmax(-1)
        return logits.masked_fill(~present, ABSENT_LOG_PROB).to(episodes.query_x.dtype)
