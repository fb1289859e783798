"""MAML: learn an initialisation from which a few SGD steps fit a new task.

Meta-objective (Finn et al. 2017, eq. 1): minimise over theta the query loss of
``theta - alpha * grad L_support(theta)`` (``inner_steps`` times), averaged over a
meta-batch of tasks. The meta-gradient differentiates through the inner steps (second
order); ``first_order`` drops the second-order terms (FOMAML).

A BatchNorm with running statistics updates them at every forward pass of meta-training
(each inner step's support pass, then the query pass, episode after episode) and uses them,
unchanged, at evaluation (eval mode): ``autometa.inner_loop``'s rule, the same for both
orders, Meta-SGD and ANIL.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from autometa import Backbone, Categorical, Episodes, Float, Int, MetaAlgorithm, Task
from autometa.inner_loop import Strategy, adapt_episodes, meta_backward


class MAML(MetaAlgorithm):
    #: Names of the parameters the inner loop adapts (None: all). ANIL adapts the head only.
    inner_params: Callable[[str], bool] | None = None

    def __init__(
        self,
        model: Backbone,
        task: Task,
        *,
        inner_lr: float = 0.01,  # alpha: step size of the inner SGD steps
        inner_steps: int = 1,  # SGD steps on the support set, in training and at test
        meta_lr: float = 1e-3,  # beta: Adam step size of the meta-update
        meta_batch_size: int = 25,  # tasks per meta-update
        first_order: bool = False,  # FOMAML: ignore second-order terms of the meta-gradient
        strategy: Strategy = "auto",  # episodes vmapped or looped; "auto": a fixed rule
    ) -> None:
        super().__init__(model, task)
        self.inner_lr = inner_lr
        self.inner_steps = inner_steps
        self.first_order = first_order
        self.strategy: Strategy = strategy
        self.tasks_per_step = meta_batch_size
        self.optimizer = torch.optim.Adam(model.parameters(), lr=meta_lr)

    @classmethod
    def search_space(cls):
        # Ranges around the paper's settings (alpha 0.01-0.4, beta 1e-3, 1-10 steps).
        return {
            "inner_lr": Float(1e-3, 0.5, log=True),
            "inner_steps": Int(1, 5),
            "meta_lr": Float(1e-4, 1e-2, log=True),
            "meta_batch_size": Categorical((4, 10, 25)),
            "first_order": Categorical((False, True)),
        }

    def _inner(self, first_order: bool) -> dict[str, Any]:
        """The inner loop's settings (keywords of autometa.inner_loop's functions)."""
        return {"steps": self.inner_steps, "lr": self.inner_lr, "first_order": first_order,
                "adapt_only": self.inner_params, "strategy": self.strategy}

    def meta_step(self, batch: Episodes) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        # Query loss after adaptation, back-propagated through the inner steps.
        loss = meta_backward(self.model, batch, self.task.loss, **self._inner(self.first_order))
        self.optimizer.step()
        return loss

    def adapt_and_predict(self, episodes: Episodes) -> Tensor:
        # torch.func.grad ignores an outer no_grad: the inner steps still see gradients,
        # but no graph back to the meta-parameters is kept.
        with torch.no_grad():
            return adapt_episodes(self.model, episodes, self.task.loss,
                                  **self._inner(first_order=True))
