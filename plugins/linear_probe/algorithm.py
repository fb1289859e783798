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

from typing import Any

from autometa import Backbone, Categorical, Float, Task
from autometa.frozen import PerEpisodeClassifier


class LinearProbe(PerEpisodeClassifier):
    label = "linear probe"
    solver = "lbfgs"

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

    def classifier(self) -> Any:
        from sklearn.linear_model import LogisticRegression

        return LogisticRegression(C=self.C, max_iter=self.max_iter)
