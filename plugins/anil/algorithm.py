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

import torch
from torch import Tensor

from autometa import Backbone, Categorical, Episodes, Float, Int, MetaAlgorithm, Task
from autometa.inner_loop import Strategy, adapt_and_predict, parameters_of


def _in_head(name: str) -> bool:
    """The parameters the inner loop adapts: the Backbone's ``head`` submodule."""
    return name.startswith("head.")


class ANIL(MetaAlgorithm):
    def __init__(
        self,
        model: Backbone,
        task: Task,
        *,
        inner_lr: float = 0.01,  # alpha: step size of the inner SGD steps on the head
        inner_steps: int = 1,  # SGD steps on the support set, in training and at test
        meta_lr: float = 1e-3,  # beta: Adam step size of the meta-update (all parameters)
        meta_batch_size: int = 25,  # tasks per meta-update
        first_order: bool = False,  # ignore second-order terms of the meta-gradient
        strategy: Strategy = "auto",  # episodes vmapped or looped; "auto" times both once
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
        # MAML's ranges, which the paper keeps (alpha 0.01-0.4, beta 1e-3, 1-5 steps).
        return {
            "inner_lr": Float(1e-3, 0.5, log=True),
            "inner_steps": Int(1, 5),
            "meta_lr": Float(1e-4, 1e-2, log=True),
            "meta_batch_size": Categorical((4, 10, 25)),
            "first_order": Categorical((False, True)),
        }

    def _predict(self, episodes: Episodes, first_order: bool) -> Tensor:
        return adapt_and_predict(
            self.model,
            parameters_of(self.model),
            episodes.support_x,
            episodes.support_y,
            episodes.query_x,
            self.task.loss,
            steps=self.inner_steps,
            lr=self.inner_lr,
            first_order=first_order,
            adapt_only=_in_head,
            strategy=self.strategy,
        )

    def meta_step(self, batch: Episodes) -> float:
        pred = self._predict(batch, self.first_order)  # (tasks, n_query, out)
        loss = self.task.loss(pred, batch.query_y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.item()

    def adapt_and_predict(self, episodes: Episodes) -> Tensor:
        # torch.func.grad ignores an outer no_grad: the inner steps still see gradients,
        # but no graph back to the meta-parameters is kept.
        with torch.no_grad():
            return self._predict(episodes, first_order=True)
