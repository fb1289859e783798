"""Prototypical Networks: classify each query by its nearest class mean in feature space.

Snell, Swersky and Zemel 2017, "Prototypical Networks for Few-shot Learning"
(arXiv:1703.05175). Each episode's support set is embedded with the backbone's
``features``; a class's prototype is the mean of its support embeddings (eq. 1) and a
query's logits are its negative squared Euclidean distances to the prototypes (eq. 2).
Meta-training minimises the query cross-entropy with Adam; the ``head`` is never used
(no gradient, unchanged). Adapting to a new episode is computing its prototypes.

Hyperparameters and ranges: Adam, learning rate 1e-3 in the paper (halved every 2,000
episodes there; constant here), searched over 1e-4 to 1e-2 as for MAML's meta-step; one
episode per update in the paper, meta-batches of 1 to 16 here; the distance, squared
Euclidean or cosine (the paper's comparison, its Figure 2, found Euclidean better).

BatchNorm in conv4 and resnet12 normalises with the statistics of the batch it sees, so
each episode's support set and query set are embedded as two batches of their own, as
MAML's inner loop does, never all episodes in one forward. (The paper's code embeds an
episode's support and query sets together; with a 16-channel conv4, 200 meta-steps on
glyphs and on digits, the two choices' meta-test accuracies differed by at most 0.03.)
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from autometa import Backbone, Categorical, Episodes, Float, MetaAlgorithm, Task
from autometa.inner_loop import Strategy, each_task, resolve_strategy

Distance = Literal["euclidean", "cosine"]

#: Cosine logits are scaled by this: unscaled, they lie in [-1, 1] and a 5-way softmax
#: cannot give the right class more than 0.65, so the cross-entropy cannot be fitted
#: ("metric scaling", Oreshkin et al. 2018, TADAM, arXiv:1805.10123).
COSINE_SCALE = 10.0


def _prototypes(support: Tensor, labels: Tensor, ways: int) -> tuple[Tensor, Tensor]:
    """Each class's mean support feature (tasks, ways, d) and support count (tasks, ways)."""
    one_hot = F.one_hot(labels, ways).to(support.dtype)
    counts = one_hot.sum(1)  # (tasks, ways): shots per class, unequal ones allowed
    prototypes = one_hot.transpose(1, 2) @ support  # (tasks, ways, d): sums
    return prototypes / counts.clamp(min=1).unsqueeze(-1), counts  # means


def _logits(query: Tensor, prototypes: Tensor, counts: Tensor, distance: Distance) -> Tensor:
    """Logits (tasks, n_query, ways) of ``query`` (tasks, n_query, d)."""
    if distance == "cosine":
        logits = COSINE_SCALE * (F.normalize(query, dim=-1)
                                 @ F.normalize(prototypes, dim=-1).transpose(1, 2))
    else:
        # -|q - c|^2 = -|q|^2 + 2 q.c - |c|^2: no (tasks, n_query, ways, d) difference
        # tensor, which would take GBs on a 200-episode evaluation chunk.
        logits = (2 * query @ prototypes.transpose(1, 2)
                  - query.pow(2).sum(-1, keepdim=True)
                  - prototypes.pow(2).sum(-1).unsqueeze(1))
    # A class absent from the support set has no prototype: never predict it.
    absent = (counts == 0).unsqueeze(1)  # (tasks, 1, ways)
    return logits.masked_fill(absent, torch.finfo(logits.dtype).min)


class _Prototypes(nn.Module):
    """ProtoNet adapted to one support set: (n, *input_shape) -> logits (n, ways)."""

    prototypes: Tensor
    counts: Tensor

    def __init__(self, features: nn.Module, prototypes: Tensor, counts: Tensor,
                 distance: Distance) -> None:
        super().__init__()
        self.features, self.distance = features, distance
        self.register_buffer("prototypes", prototypes.detach().clone())  # (1, ways, d)
        self.register_buffer("counts", counts.detach().clone())  # (1, ways)

    def forward(self, x: Tensor) -> Tensor:
        return _logits(self.features(x)[None], self.prototypes, self.counts, self.distance)[0]


class _Adapt(nn.Module):
    """A support set's prototypes and counts: (n, *in), (n,) -> (1, ways, d), (1, ways)."""

    def __init__(self, features: nn.Module, ways: int) -> None:
        super().__init__()
        self.features, self.ways = features, ways

    def forward(self, support_x: Tensor, support_y: Tensor) -> tuple[Tensor, Tensor]:
        return _prototypes(self.features(support_x)[None], support_y[None], self.ways)


class _Predict(nn.Module):
    """Logits (m, ways) of query examples (m, *in) for prototypes and counts."""

    def __init__(self, features: nn.Module, distance: Distance) -> None:
        super().__init__()
        self.features, self.distance = features, distance

    def forward(self, x: Tensor, prototypes: Tensor, counts: Tensor) -> Tensor:
        return _logits(self.features(x)[None], prototypes, counts, self.distance)[0]


class ProtoNet(MetaAlgorithm):
    kinds = frozenset({"classification"})

    def __init__(
        self,
        model: Backbone,
        task: Task,
        *,
        lr: float = 1e-3,  # Adam step size (the paper's)
        meta_batch_size: int = 1,  # episodes per update (the paper: one)
        distance: Distance = "euclidean",  # "cosine": COSINE_SCALE * cosine similarity
        strategy: Strategy = "auto",  # episodes vmapped or looped; "auto": see _embed
    ) -> None:
        super().__init__(model, task)
        if distance not in ("euclidean", "cosine"):
            raise ValueError(f"unknown distance {distance!r}; expected 'euclidean' or 'cosine'")
        if strategy not in ("auto", "vmap", "loop"):
            raise ValueError(f"unknown strategy {strategy!r}; expected 'auto', 'vmap' or 'loop'")
        self.distance: Distance = distance
        self.strategy: Strategy = strategy
        self.tasks_per_step = meta_batch_size
        self.optimizer = torch.optim.Adam(model.parameters(), lr=lr)

    @classmethod
    def search_space(cls):
        return {
            "lr": Float(1e-4, 1e-2, log=True),
            "meta_batch_size": Categorical((1, 4, 16)),
            "distance": Categorical(("euclidean", "cosine")),
        }

    def meta_step(self, batch: Episodes) -> float:
        logits = self._logits(batch)  # (tasks, n_query, ways)
        loss = self.task.loss(logits, batch.query_y)  # mean over tasks and queries
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.item()

    def adapt_and_predict(self, episodes: Episodes) -> Tensor:
        with torch.no_grad():
            return self._logits(episodes)

    def _logits(self, episodes: Episodes) -> Tensor:
        """Logits of each query for each class: (tasks, n_query, output_size)."""
        support, query = self._embed(episodes)  # (tasks, n_support, d), (tasks, n_query, d)
        prototypes, counts = _prototypes(support, episodes.support_y, self.task.output_size)
        return _logits(query, prototypes, counts, self.distance)

    def adapted_module(self, support_x: Tensor, support_y: Tensor) -> nn.Module:
        """The features, and the prototypes of this support set (buffers): a query set's
        logits, as :meth:`adapt_and_predict` computes them."""
        features = self.model.features
        training = features.training
        features.eval()
        try:
            with torch.no_grad():
                support = features(support_x)[None]  # (1, n_support, d): one batch
            prototypes, counts = _prototypes(support, support_y[None], self.task.output_size)
        finally:
            features.train(training)
        return _Prototypes(copy.deepcopy(features), prototypes, counts, self.distance).eval()

    def adaptation_modules(self) -> tuple[nn.Module, nn.Module]:
        """Prototypes from a support set (``adapt``), logits from them (``predict``)."""
        features = copy.deepcopy(self.model.features).eval()
        features.requires_grad_(False)
        return _Adapt(features, self.task.output_size), _Predict(features, self.distance)

    def _embed(self, episodes: Episodes) -> tuple[Tensor, Tensor]:
        """Features of each episode's support and query sets, each embedded as one batch.

        ``"auto"`` is ``autometa.inner_loop.choose_strategy``: the loop for convolutional
        features (and where a pass writes BatchNorm running statistics, which vmap
        cannot), vmap otherwise. Measured here on a busy 2-core CPU, one thread,
        5-way 1-shot 15-query episodes, ms for vmap / loop (meta-step on 1, 4 and 16
        episodes; evaluation of 200 episodes, 50 for 28x28):

        * MLP (40 hidden), digits 8x8: 2.9 / 1.8, 3.5 / 8.3, 8.9 / 23.2; 25 / 79.
        * conv4 (64 channels), digits 8x8: 74 / 49, 234 / 198, 890 / 807; 7,110 / 2,780.
        * conv4 (64 channels), 28x28: 244 / 321, 1,690 / 1,140, 12,509 / 7,320;
          19,793 / 13,374.
        """
        features = self.model.features
        strategy = resolve_strategy(features, self.strategy, first_order=True)
        out = each_task(lambda s, q: {"support": features(s), "query": features(q)},
                        episodes.support_x, episodes.query_x, strategy=strategy)
        return out["support"], out["query"]
