"""Meta-SGD: learn the initialisation and a learning rate for every parameter entry.

Li, Zhou, Chen and Li 2017, "Meta-SGD: Learning to Learn Quickly for Few-Shot Learning"
(arXiv:1707.09835). The inner step is ``theta - alpha * grad L_support(theta)`` with alpha
a tensor of theta's shape and ``*`` elementwise (section 3): alpha sets both the size and
the direction of the update. theta and alpha are meta-learned jointly by Adam on the query
loss after adaptation, differentiating through the inner step (second order;
``first_order`` drops the second-order terms, and alpha is still learned). The paper
adapts in a single step, in training and at test.

Ranges from its experiments (section 4): alpha's entries initialised in [0.005, 0.1] (the
paper draws them uniformly; here all start at ``init_inner_lr``, searched over that
interval); Adam step 1e-3; meta-batches of 4 tasks for regression, MAML's larger ones for
classification.
"""

from __future__ import annotations

from autometa import Backbone, Categorical, Float, GradientMetaLearner, Task
from autometa.adapters import LORA_SPACE, Adapter, LoraTargets
from autometa.inner_loop import Strategy
from autometa.space import SearchSpace


class MetaSGD(GradientMetaLearner):
    """MAML whose scalar inner step is replaced by learned per-entry rates ``inner_lr``
    (``{parameter name: tensor}``, saved in the state dict)."""

    learn_inner_lr = True

    def __init__(
        self,
        model: Backbone,
        task: Task,
        *,
        init_inner_lr: float = 0.01,  # initial value of every entry of the learned rates alpha
        inner_steps: int = 1,  # SGD steps on the support set, in training and at test
        meta_lr: float = 1e-3,  # Adam step size of the meta-update of theta and alpha
        meta_batch_size: int = 4,  # tasks per meta-update
        first_order: bool = False,  # ignore second-order terms of the meta-gradient
        strategy: Strategy = "auto",  # episodes vmapped or looped; "auto": a fixed rule
        adapter: Adapter = "none",  # "lora": train LoRA adapters and the head, features frozen
        lora_rank: int = 8,  # r of LoRA's update (alpha / r) B A (adapter "lora")
        lora_alpha: float = 16.0,  # alpha of LoRA's update (adapter "lora")
        lora_targets: LoraTargets = "attention",  # "attention" (q/k/v projections) or "linear"
    ) -> None:
        # Named init_inner_lr, not inner_lr: stored studies hold that name.
        super().__init__(model, task, inner_lr=init_inner_lr, inner_steps=inner_steps,
                         meta_lr=meta_lr, meta_batch_size=meta_batch_size,
                         first_order=first_order, strategy=strategy, adapter=adapter,
                         lora_rank=lora_rank, lora_alpha=lora_alpha,
                         lora_targets=lora_targets)

    @classmethod
    def search_space(cls) -> SearchSpace:
        # Ranges around the paper's settings (alpha init in [0.005, 0.1], beta 1e-3,
        # meta-batch 4 to 32, one inner step).
        return {
            "init_inner_lr": Float(0.005, 0.1, log=True),
            "meta_lr": Float(1e-4, 1e-2, log=True),
            "meta_batch_size": Categorical((4, 16, 32)),
            "first_order": Categorical((False, True)),
            **LORA_SPACE,  # searched only with adapter="lora"; rates for adapters and head
        }
