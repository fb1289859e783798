"""Fine-tuning baseline: supervised training on meta-train data, then SGD on each support set.

Meta-training pools the support and query examples of sampled meta-train episodes into
one supervised batch (the "pretrained" baseline of Finn et al. 2017). Adaptation runs
``finetune_steps`` of full-batch SGD on the support set, on all parameters or on the
head only, starting each episode from the same pre-trained weights.

Regression only for now: pooling classification episodes would mix their per-episode
labels; classification pre-training needs the task's global labels.
"""

from __future__ import annotations

import torch
from torch import Tensor

from autometa import Backbone, Categorical, Episodes, Float, Int, MetaAlgorithm, Task
from autometa.inner_loop import adapt_episodes


class FineTune(MetaAlgorithm):
    kinds = frozenset({"regression"})

    def __init__(
        self,
        model: Backbone,
        task: Task,
        *,
        lr: float = 1e-3,  # Adam step size of pre-training
        batch_tasks: int = 25,  # meta-train episodes pooled into one pre-training batch
        finetune_lr: float = 0.01,  # SGD step size on the support set
        finetune_steps: int = 10,  # SGD steps on the support set
        finetune: str = "all",  # "all" parameters or the "head" only
    ) -> None:
        super().__init__(model, task)
        self.finetune_lr = finetune_lr
        self.finetune_steps = finetune_steps
        self.finetune = finetune
        self.tasks_per_step = batch_tasks
        self.optimizer = torch.optim.Adam(model.parameters(), lr=lr)

    @classmethod
    def search_space(cls):
        return {
            "lr": Float(1e-4, 1e-2, log=True),
            "finetune_lr": Float(1e-3, 0.5, log=True),
            "finetune_steps": Int(1, 100, log=True),
            "finetune": Categorical(("all", "head")),
        }

    def meta_step(self, batch: Episodes) -> float:
        x = torch.cat([batch.support_x, batch.query_x], 1).flatten(0, 1)  # (tasks*n, *in)
        y = torch.cat([batch.support_y, batch.query_y], 1).flatten(0, 1)
        loss = self.task.loss(self.model(x), y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.item()

    def adapt_and_predict(self, episodes: Episodes) -> Tensor:
        head_only = self.finetune == "head"
        with torch.no_grad():  # plain SGD: no meta-gradient through the steps
            return adapt_episodes(
                self.model,
                episodes,
                self.task.loss,
                steps=self.finetune_steps,
                lr=self.finetune_lr,
                first_order=True,
                adapt_only=(lambda n: n.startswith("head.")) if head_only else None,
            )
