"""ANIL: MAML whose inner loop adapts the head only ("Almost No Inner Loop").

Raghu, Raghu, Bengio and Vinyals 2020, "Rapid Learning or Feature Reuse? Towards
Understanding the Effectiveness of MAML" (arXiv:1909.09157, ICLR 2020). Section 4 finds
that MAML's adaptation barely changes the body's representations, so ANIL runs the inner
SGD steps on the head alone; the features are reused as they are. The outer loop is
MAML's: the query loss after adaptation is differentiated (through the inner steps,
second order, unless ``first_order``) with respect to every parameter, body and head, and
Adam updates all of them. The paper keeps MAML's hyperparameters (Finn et al. 2017: inner
step 0.01 to 0.4, 1 to 5 steps, Adam 1e-3, meta-batches of 2 to 32 tasks).
"""

from __future__ import annotations

from autometa import Categorical, Float, GradientMetaLearner, Int
from autometa.adapters import LORA_SPACE
from autometa.gradient import head_only
from autometa.space import SearchSpace


class ANIL(GradientMetaLearner):
    """MAML with the inner loop on the head; same hyperparameters and search space."""

    adapt_only = staticmethod(head_only)

    @classmethod
    def search_space(cls) -> SearchSpace:
        # MAML's ranges, as the paper keeps MAML's settings.
        return {
            "inner_lr": Float(1e-3, 0.5, log=True),
            "inner_steps": Int(1, 5),
            "meta_lr": Float(1e-4, 1e-2, log=True),
            "meta_batch_size": Categorical((4, 10, 25)),
            "first_order": Categorical((False, True)),
            **LORA_SPACE,  # searched only with adapter="lora"
        }
