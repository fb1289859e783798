"""Meta-algorithms that never meta-train: a classifier fitted on each episode's support
features, the source model frozen.

Nearest class mean (Snell et al. 2017 at inference; SimpleShot, Wang et al. 2019),
per-episode logistic regression (Tian et al. 2020, "Rethinking Few-Shot Image
Classification: a Good Embedding Is All You Need?") and a linear SVM are the field's
baselines on frozen features. :class:`FrozenFeatureAlgorithm` holds what they share:
``meta_trains = False`` (the engine skips meta-training), a ``meta_step`` that refuses to
run, and :meth:`~FrozenFeatureAlgorithm.frozen_features`, each episode's features as the
source model gives them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from autometa.algorithm import MetaAlgorithm
from autometa.task import Episodes

__all__ = ["ABSENT_LOG_PROB", "FrozenFeatureAlgorithm"]

#: Log-probability of a class absent from an episode's support set: never predicted,
#: and finite, so metrics and losses stay numbers.
ABSENT_LOG_PROB = -1e9


class FrozenFeatureAlgorithm(MetaAlgorithm):
    """Base of a classifier fitted per episode on the source model's features as they are.

    A subclass implements ``adapt_and_predict`` with :meth:`frozen_features` and declares
    its ``search_space``; classes absent from an episode's support set should get
    :data:`ABSENT_LOG_PROB`.
    """

    kinds = frozenset({"classification"})
    meta_trains = False

    def meta_step(self, batch: Episodes) -> float:
        raise NotImplementedError(
            f"{type(self).__name__} does not meta-train (meta_trains is False): the engine "
            "never calls meta_step; its features come from the source model as they are"
        )

    def frozen_features(self, episodes: Episodes, *, normalize: bool = False
                        ) -> tuple[Tensor, Tensor]:
        """Float64 features of the support and query sets, flattened: shapes
        (tasks, n_support, d) and (tasks, n_query, d), on the episodes' device; with
        ``normalize``, each feature vector scaled to unit L2 norm.

        Each set is one batch of its own (a BatchNorm without running statistics
        normalises with the batch's), without gradients, in eval mode (a BatchNorm with
        running statistics uses them and leaves them unchanged); the model's mode is
        restored after.

        Raises:
            FloatingPointError: a feature is NaN or infinite, with the episodes it is in
                (the engine records the trial as diverged).
        """
        features = self.model.features
        training = features.training
        features.eval()
        try:
            with torch.no_grad():
                support = torch.stack([features(x) for x in episodes.support_x])
                query = torch.stack([features(x) for x in episodes.query_x])
        finally:
            features.train(training)
        support, query = support.flatten(2).double(), query.flatten(2).double()
        bad = ~(support.isfinite().all(-1).all(-1) & query.isfinite().all(-1).all(-1))
        if bool(bad.any()):
            shown = ", ".join(str(i) for i in bad.nonzero().flatten()[:5].tolist())
            raise FloatingPointError(
                f"{type(self).__name__}: the source model's features are NaN or infinite in "
                f"{int(bad.sum())} of {len(bad)} episodes (first: {shown}); its weights or "
                "the task's inputs are not finite")
        if normalize:
            support, query = F.normalize(support, dim=-1), F.normalize(query, dim=-1)
        return support, query
