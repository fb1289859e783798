"""MAML: learn an initialisation from which a few SGD steps fit a new task.

Meta-objective (Finn et al. 2017, eq. 1): minimise over theta the query loss of
``theta - alpha * grad L_support(theta)`` (``inner_steps`` times), averaged over a
meta-batch of tasks. The meta-gradient differentiates through the inner steps (second
order); ``first_order`` drops the second-order terms (FOMAML).

A BatchNorm with running statistics updates them at every forward pass of meta-training
(each inner step's support pass, then the query pass, episode after episode) and uses them,
unchanged, at evaluation (eval mode): ``autometa.inner_loop``'s rule, the same for both
orders, Meta-SGD and ANIL.

The machinery is :class:`autometa.gradient.GradientMetaLearner`'s, whose constructor
keywords are MAML's hyperparameters; this plugin adds the search space.
"""

from __future__ import annotations

from autometa import Categorical, Float, GradientMetaLearner, Int
from autometa.adapters import LORA_SPACE
from autometa.space import SearchSpace


class MAML(GradientMetaLearner):
    """Model-Agnostic Meta-Learning (Finn, Abbeel and Levine 2017, arXiv:1703.03400): every
    parameter adapted by ``inner_steps`` SGD steps of size ``inner_lr``."""

    @classmethod
    def search_space(cls) -> SearchSpace:
        # Ranges around the paper's settings (alpha 0.01-0.4, beta 1e-3, 1-10 steps).
        return {
            "inner_lr": Float(1e-3, 0.5, log=True),
            "inner_steps": Int(1, 5),
            "meta_lr": Float(1e-4, 1e-2, log=True),
            "meta_batch_size": Categorical((4, 10, 25)),
            "first_order": Categorical((False, True)),
            **LORA_SPACE,  # searched only with adapter="lora"
        }
