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

from typing import Any

from autometa import Backbone, Categorical, Float, Task
from autometa.frozen import PerEpisodeClassifier


class LinearSVM(PerEpisodeClassifier):
    label = "linear SVM"
    solver = "liblinear"

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

    def classifier(self) -> Any:
        from sklearn.svm import LinearSVC

        # dual: fewer examples than features (few-shot) is liblinear's dual case; seeded,
        # liblinear shuffles its coordinates.
        return LinearSVC(C=self.C, max_iter=self.max_iter, dual=True, random_state=0)
