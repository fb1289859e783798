"""Linear SVM: a one-vs-rest linear support vector machine fitted on each episode's
support features, predicting its query set.

scikit-learn's ``LinearSVC`` (liblinear; squared hinge loss, L2 penalty, one-vs-rest;
Fan et al. 2008, "LIBLINEAR: A Library for Large Linear Classification", JMLR 9). An SVM
on frozen features is a classic few-shot head: MetaOptNet (Lee, Maji, Ravichandran and
Soatto 2019, "Meta-Learning with Differentiable Convex Optimization", arXiv:1904.03758)
meta-trains features through a multi-class SVM; here the SVM is fitted on the source
model's features as they are, with no meta-training (``meta_trains = False``: the engine
skips it), as AutoGluon's few-shot and tabular presets use linear models as baselines.
On the ``raw`` source it is a linear SVM on the inputs themselves.

Settings: ``C`` (scikit-learn's default 1, searched over 1e-3 to 1e3) and ``normalize``
(features scaled to unit L2 norm first, as the linear probe does; so that ``C`` means the
same whatever the scale of the inputs). Classes absent from an episode's support set get
``autometa.frozen.ABSENT_LOG_PROB`` and are never predicted; a support set of one class
predicts it.
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


class LinearSVM(FrozenFeatureAlgorithm):
    def __init__(
        self,
        model: Backbone,
        task: Task,
        *,
        C: float = 1.0,  # inverse regularisation strength (scikit-learn's default)
        normalize: bool = True,  # scale each feature vector to unit L2 norm
        max_iter: int = 1000,  # liblinear iterations per episode (scikit-learn's default)
    ) -> None:
        super().__init__(model, task)
        self.C = C
        self.normalize = normalize
        self.max_iter = max_iter

    @classmethod
    def search_space(cls):
        return {"C": Float(1e-3, 1e3, log=True), "normalize": Categorical((True, False))}

    def adapt_and_predict(self, episodes: Episodes) -> Tensor:
        """Log-probabilities (tasks, n_query, output_size): ``log_softmax`` of the SVM's
        decision values over the episode's classes; absent classes get
        ``ABSENT_LOG_PROB``.

        Raises:
            FloatingPointError: a feature is NaN or infinite (the engine records the
                trial as diverged).
        """
        from threadpoolctl import threadpool_limits  # a scikit-learn dependency

        support, query = (f.cpu().numpy() for f in
                          self.frozen_features(episodes, normalize=self.normalize))
        labels = episodes.support_y.cpu().numpy()
        out = np.full((*query.shape[:2], self.task.output_size), ABSENT_LOG_PROB)
        unconverged = 0
        with threadpool_limits(limits=1):  # tiny problems: more threads only synchronise
            for i, (s, y, q) in enumerate(zip(support, labels, query, strict=True)):
                out[i], converged = self._fit_predict(s, y, q)
                unconverged += not converged
        if unconverged:
            log.info("linear SVM: liblinear stopped at max_iter=%d before converging on %d "
                     "of %d episodes (C=%g)", self.max_iter, unconverged, len(episodes),
                     self.C)
        return torch.as_tensor(out, dtype=episodes.query_x.dtype, device=episodes.query_x.device)

    def _fit_predict(self, support: np.ndarray, labels: np.ndarray, query: np.ndarray
                     ) -> tuple[np.ndarray, bool]:
        """Log-probabilities (n_query, output_size) of one episode and whether liblinear
        converged."""
        from scipy.special import log_softmax
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.svm import LinearSVC

        out = np.full((len(query), self.task.output_size), ABSENT_LOG_PROB)
        classes = np.unique(labels)
        if len(classes) == 1:  # nothing to discriminate: the one class seen, with certainty
            out[:, classes[0]] = 0.0
            return out, True
        # dual: fewer examples than features (few-shot) is liblinear's dual case; seeded,
        # liblinear shuffles its coordinates.
        clf = LinearSVC(C=self.C, max_iter=self.max_iter, dual=True, random_state=0)
        with warnings.catch_warnings(record=True) as caught:
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
        out[:, clf.classes_] = log_softmax(scores, axis=1)
        return out, converged
