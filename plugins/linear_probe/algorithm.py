"""Linear probe: logistic regression on the frozen features of the source model.

Tian, Wang, Krishnan, Tenenbaum and Isola 2020, "Rethinking Few-Shot Image
Classification: a Good Embedding Is All You Need?" (arXiv:2003.11539): a backbone trained
once on the meta-train classes, frozen, and a logistic regression fitted on each
episode's support features (scikit-learn, L2-normalised features) predicts its query set.

Nothing is meta-trained (``meta_trains = False``: the engine skips meta-training), so the
features are whatever the source model gives: choose the ``pretrained`` or ``checkpoint``
source for the paper's recipe; on a randomly initialised network this is a random-feature
baseline.

Settings from the paper's released code (github.com/WangYueFt/rfs, eval/meta_eval.py):
scikit-learn's ``LogisticRegression`` with lbfgs, multinomial, L2 penalty, C = 1,
``max_iter`` 1,000, on L2-normalised features of the network in eval mode. Searched here:
the inverse regularisation strength ``C`` over 1e-3 to 1e3 around that default, and
``normalize`` both ways.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
import torch
from torch import Tensor

from autometa import Backbone, Categorical, Episodes, Float, Task
from autometa.frozen import ABSENT_LOG_PROB, FrozenFeatureAlgorithm

log = logging.getLogger(__name__)


class LinearProbe(FrozenFeatureAlgorithm):
    def __init__(
        self,
        model: Backbone,
        task: Task,
        *,
        C: float = 1.0,  # inverse L2 regularisation strength (scikit-learn's default)
        normalize: bool = True,  # scale each feature vector to unit L2 norm (the paper)
        # lbfgs iterations per episode (the paper's code: 1,000); enough for C = 1e3 on
        # 5-way 5-shot digits with 40 features, normalised or not.
        max_iter: int = 1000,
    ) -> None:
        super().__init__(model, task)
        self.C = C
        self.normalize = normalize
        self.max_iter = max_iter

    @classmethod
    def search_space(cls):
        return {
            "C": Float(1e-3, 1e3, log=True),
            "normalize": Categorical((True, False)),
        }

    def adapt_and_predict(self, episodes: Episodes) -> Tensor:
        """Log-probabilities (tasks, n_query, output_size); absent classes get
        ``ABSENT_LOG_PROB``."""
        from threadpoolctl import threadpool_limits  # a scikit-learn dependency

        support, query = (f.cpu().numpy() for f in
                          self.frozen_features(episodes, normalize=self.normalize))
        out = np.full((*query.shape[:2], self.task.output_size), ABSENT_LOG_PROB)
        labels = episodes.support_y.cpu().numpy()
        unconverged = 0
        # One BLAS/OpenMP thread: the problems are tiny (tens of examples and features);
        # more threads only add synchronisation. Measured on a busy 2-core CPU, a 5-way
        # 5-shot fit on 40 features with 2 threads took 42 ms (C = 1) and 288 ms (C = 1e3),
        # with one 3.6 ms and 10.6 ms.
        with threadpool_limits(limits=1):
            for i, (s, y, q) in enumerate(zip(support, labels, query, strict=True)):
                out[i], converged = self._fit_predict(s, y, q)
                unconverged += not converged
        if unconverged:
            log.info("linear probe: lbfgs stopped at max_iter=%d before converging on %d of "
                     "%d episodes (C=%g)", self.max_iter, unconverged, len(episodes), self.C)
        return torch.as_tensor(out, dtype=episodes.query_x.dtype, device=episodes.query_x.device)

    def _fit_predict(self, support: np.ndarray, labels: np.ndarray, query: np.ndarray
                     ) -> tuple[np.ndarray, bool]:
        """Log-probabilities (n_query, output_size) of one episode and whether lbfgs converged."""
        from scipy.special import log_softmax
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.linear_model import LogisticRegression

        out = np.full((len(query), self.task.output_size), ABSENT_LOG_PROB)
        classes = np.unique(labels)
        if len(classes) == 1:  # nothing to discriminate: the one class seen, with certainty
            out[:, classes[0]] = 0.0
            return out, True
        clf = LogisticRegression(C=self.C, max_iter=self.max_iter)
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
        scores = clf.decision_function(query)  # (n_query, classes), or (n_query,) for two
        if scores.ndim == 1:  # binary: the score of classes_[1] against classes_[0]
            scores = np.stack([np.zeros_like(scores), scores], 1)
        # predict_log_proba's values, but log_softmax never rounds a probability to 0.
        out[:, clf.classes_] = log_softmax(scores, axis=1)
        return out, converged
