"""Meta-algorithms that never meta-train: a classifier fitted on each episode's support
features, the source model frozen.

Nearest class mean (Snell et al. 2017 at inference; SimpleShot, Wang et al. 2019),
per-episode logistic regression (Tian et al. 2020, "Rethinking Few-Shot Image
Classification: a Good Embedding Is All You Need?") and a linear SVM are the field's
baselines on frozen features. :class:`FrozenFeatureAlgorithm` holds what they share:
``meta_trains = False`` (the engine skips meta-training), a ``meta_step`` that refuses to
run, and :meth:`~FrozenFeatureAlgorithm.frozen_features`, each episode's features as the
source model gives them. :class:`PerEpisodeClassifier` adds, for a scikit-learn linear
classifier, the fit on each episode's support set and the prediction of its query set.

When the engine evaluates one on fixed episodes held as indices, it may hand
``adapt_and_predict`` :class:`EmbeddedEpisodes`: the same episodes (images and labels, as
ever), plus the features the frozen network gives each example, computed once per
(source, weights, data) and shared by every trial (:mod:`autometa.feature_store`).
:meth:`~FrozenFeatureAlgorithm.frozen_features` then reads them instead of running the
network; any other use of the episodes sees what it always saw.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from autometa.algorithm import MetaAlgorithm
from autometa.task import Episodes

__all__ = ["ABSENT_LOG_PROB", "EmbeddedEpisodes", "FrozenFeatureAlgorithm",
           "PerEpisodeClassifier"]

log = logging.getLogger(__name__)

#: Log-probability of a class absent from an episode's support set: never predicted,
#: and finite, so metrics and losses stay numbers.
ABSENT_LOG_PROB = -1e9


@dataclass(frozen=True, eq=False)
class EmbeddedEpisodes(Episodes):
    """:class:`~autometa.task.Episodes` with each example's features already computed by
    the frozen network ``embedded_by`` (in eval mode, one example's features independent
    of the others in its batch: :mod:`autometa.feature_store` checks it).

    Shapes: ``support_features`` (tasks, n_support, d), ``query_features`` (tasks,
    n_query, d), float32, on the episodes' device; the other fields as in ``Episodes``.
    Indexing and ``to`` keep the features.
    """

    support_features: Tensor
    query_features: Tensor
    embedded_by: nn.Module

    def _fields(self) -> list[str]:
        return [f.name for f in fields(Episodes)] + ["support_features", "query_features"]

    def __getitem__(self, index: int | slice | Tensor) -> EmbeddedEpisodes:
        s_x, s_y, q_x, q_y, s_f, q_f = (getattr(self, f)[index] for f in self._fields())
        return EmbeddedEpisodes(s_x, s_y, q_x, q_y, s_f, q_f, self.embedded_by)

    def to(self, device: torch.device | str) -> EmbeddedEpisodes:
        s_x, s_y, q_x, q_y, s_f, q_f = (getattr(self, f).to(device) for f in self._fields())
        return EmbeddedEpisodes(s_x, s_y, q_x, q_y, s_f, q_f, self.embedded_by)


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
        restored after. :class:`EmbeddedEpisodes` embedded by this model's ``features``
        give their stored features instead (the same numbers, to float32 round-off: the
        network saw the examples in other batches).

        Raises:
            FloatingPointError: a feature is NaN or infinite, with the episodes it is in
                (the engine records the trial as diverged).
        """
        features = self.model.features
        if isinstance(episodes, EmbeddedEpisodes) and episodes.embedded_by is features:
            support, query = episodes.support_features, episodes.query_features
        else:
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


class PerEpisodeClassifier(FrozenFeatureAlgorithm):
    """A scikit-learn linear classifier fitted on each episode's support features and
    scoring its query set: ``log_softmax`` of its ``decision_function`` over the episode's
    classes; classes absent from the support set get :data:`ABSENT_LOG_PROB`, and a
    support set of one class predicts it with certainty.

    A subclass returns an unfitted estimator from :meth:`classifier` and sets
    ``normalize`` (features at unit L2 norm first), ``max_iter``, ``C`` and ``label`` /
    ``solver`` (named in the log line counting the episodes where it did not converge).
    """

    label: ClassVar[str] = "classifier"
    solver: ClassVar[str] = "the solver"
    normalize: bool
    max_iter: int
    C: float

    def classifier(self) -> Any:
        """An unfitted scikit-learn classifier with ``fit`` and ``decision_function``."""
        raise NotImplementedError

    def adapt_and_predict(self, episodes: Episodes) -> Tensor:
        """Log-probabilities (tasks, n_query, output_size).

        Raises:
            FloatingPointError: a feature is NaN or infinite (the engine records the
                trial as diverged).
        """
        from threadpoolctl import threadpool_limits  # a scikit-learn dependency

        support, query = (f.cpu().numpy() for f in
                          self.frozen_features(episodes, normalize=self.normalize))
        out = np.full((*query.shape[:2], self.task.output_size), ABSENT_LOG_PROB)
        labels = episodes.support_y.cpu().numpy()
        unconverged = 0
        # One BLAS/OpenMP thread: the problems are tiny (tens of examples and features);
        # more threads only add synchronisation. Measured on a busy 2-core CPU, a 5-way
        # 5-shot logistic regression on 40 features with 2 threads took 42 ms (C = 1) and
        # 288 ms (C = 1e3), with one 3.6 ms and 10.6 ms.
        with threadpool_limits(limits=1):
            for i, (s, y, q) in enumerate(zip(support, labels, query, strict=True)):
                out[i], converged = self._fit_predict(s, y, q)
                unconverged += not converged
        if unconverged:
            log.info("%s: %s stopped at max_iter=%d before converging on %d of %d episodes "
                     "(C=%g)", self.label, self.solver, self.max_iter, unconverged,
                     len(episodes), self.C)
        return torch.as_tensor(out, dtype=episodes.query_x.dtype, device=episodes.query_x.device)

    def _fit_predict(self, support: np.ndarray, labels: np.ndarray, query: np.ndarray
                     ) -> tuple[np.ndarray, bool]:
        """Log-probabilities (n_query, output_size) of one episode and whether the solver
        converged."""
        from scipy.special import log_softmax

        out = np.full((len(query), self.task.output_size), ABSENT_LOG_PROB)
        clf, classes, converged = self._fit(support, labels)
        if clf is None:  # nothing to discriminate: the one class seen, with certainty
            out[:, classes[0]] = 0.0
            return out, True
        scores = clf.decision_function(query)  # (n_query, classes), or (n_query,) for two
        if scores.ndim == 1:  # binary: the score of classes_[1] against classes_[0]
            scores = np.stack([np.zeros_like(scores), scores], 1)
        # predict_log_proba's values for a logistic regression, but log_softmax never
        # rounds a probability to 0.
        out[:, clf.classes_] = log_softmax(scores, axis=1)
        return out, converged

    def _fit(self, support: np.ndarray, labels: np.ndarray) -> tuple[Any, np.ndarray, bool]:
        """The classifier fitted on one episode's support features (None for a support set
        of one class), the classes seen, and whether the solver converged."""
        from sklearn.exceptions import ConvergenceWarning

        classes = np.unique(labels)
        if len(classes) == 1:
            return None, classes, True
        clf = self.classifier()
        with warnings.catch_warnings(record=True) as caught:
            # Counted and logged once per call by adapt_and_predict instead of one warning
            # per episode; every other warning is re-emitted.
            warnings.simplefilter("always", ConvergenceWarning)
            clf.fit(support, labels)
        converged = True
        for w in caught:
            if issubclass(w.category, ConvergenceWarning):
                converged = False
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        return clf, classes, converged

    def adapted_module(self, support_x: Tensor, support_y: Tensor) -> nn.Module:
        """The features, and the linear classifier fitted on this support set (its
        ``coef_`` and ``intercept_`` as buffers): log-probabilities as
        :meth:`adapt_and_predict` gives them, its decision function in torch float64."""
        from threadpoolctl import threadpool_limits

        support, _ = self.frozen_features(Episodes(support_x[None], support_y[None],
                                                   support_x[None], support_y[None]),
                                          normalize=self.normalize)
        ways = self.task.output_size
        with threadpool_limits(limits=1):
            clf, classes, _ = self._fit(support[0].cpu().numpy(), support_y.cpu().numpy())
        device = support_x.device
        if clf is None:
            weight = torch.zeros(1, support.shape[-1], dtype=torch.float64, device=device)
            bias = torch.zeros(1, dtype=torch.float64, device=device)
            seen = torch.as_tensor(classes, device=device)
        else:
            weight = torch.as_tensor(np.asarray(clf.coef_, np.float64), device=device)
            bias = torch.as_tensor(np.asarray(clf.intercept_, np.float64), device=device)
            seen = torch.as_tensor(clf.classes_, device=device)
        return _LinearScores(_copy(self.model.features), weight, bias, seen, ways,
                             self.normalize, support_x.dtype)


class _LinearScores(nn.Module):
    """A linear classifier on frozen features, fitted on one support set: (n, *input_shape)
    -> log-probabilities (n, output_size), :data:`ABSENT_LOG_PROB` for classes not seen."""

    weight: Tensor
    bias: Tensor
    seen: Tensor

    def __init__(self, features: nn.Module, weight: Tensor, bias: Tensor, seen: Tensor,
                 ways: int, normalize: bool, dtype: torch.dtype) -> None:
        super().__init__()
        self.features, self.ways, self.normalize, self.dtype = features, ways, normalize, dtype
        self.register_buffer("weight", weight)  # (k, d): k = 1 for two classes
        self.register_buffer("bias", bias)  # (k,)
        self.register_buffer("seen", seen)  # (classes seen,) labels

    def forward(self, x: Tensor) -> Tensor:
        features = self.features(x).flatten(1).double()
        if self.normalize:
            features = F.normalize(features, dim=-1)
        scores = features @ self.weight.T + self.bias  # (n, k)
        if self.weight.shape[0] == 1:  # binary (or one class): classes_[1] against [0]
            scores = torch.cat([torch.zeros_like(scores), scores], 1)[:, -len(self.seen):]
        # shape[0], not len(): len() would fix an exported program's batch size
        out = scores.new_full((scores.shape[0], self.ways), ABSENT_LOG_PROB)
        out[:, self.seen] = scores.log_softmax(-1)
        return out.to(self.dtype)


def _copy(module: nn.Module) -> nn.Module:
    """A frozen copy of ``module`` in eval mode (the exported model's own)."""
    import copy

    out = copy.deepcopy(module).eval()
    out.requires_grad_(False)
    return out
