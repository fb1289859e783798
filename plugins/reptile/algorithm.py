"""Reptile: train on each task, then move the initialisation towards the trained weights.

Nichol, Achiam and Schulman 2018, "On First-Order Meta-Learning Algorithms"
(arXiv:1803.02999), Algorithm 2 (batched): for each task of a meta-batch run ``k`` steps of
SGD from theta on the task's examples, giving phi_i, then

    theta <- theta + epsilon * mean_i (phi_i - theta).

No gradient flows through the inner steps. With k = 1 this is joint training on the
mixture of tasks; with k > 1 the update also carries second-order terms that favour
initialisations from which a task's gradient steps agree (section 5). The inner loop runs
full-batch SGD on all of a task's examples, support and query together (the paper's
"train shots"; it used minibatches of them).

Hyperparameters and ranges, from the paper's released commands (github.com/openai/
supervised-reptile) and its sine-wave demo: outer step size epsilon 0.235 to 1 for
few-shot classification (annealed to 0 there; constant here), 0.1 on sine waves; 1 (demo)
to 10 tasks per meta-batch; 3 to 19 inner iterations in training but 5 to 100 at
evaluation, hence a separate ``eval_steps``; SGD step 0.02 on sine waves (the
classification runs used Adam with beta1 = 0 in the inner loop; plain SGD here).

A BatchNorm with running statistics (``autometa.inner_loop``'s rule) updates them at every
training-mode pass of a meta-step, in order: each task's pass before adaptation (the
logged loss), then each task's ``k`` inner steps, task after task; at evaluation (eval
mode) it uses them and leaves them unchanged. Such a model runs the loop.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import functional_call

from autometa import Backbone, Categorical, Episodes, Float, Int, MetaAlgorithm, Task
from autometa.inner_loop import (
    Params,
    Strategy,
    adapt,
    adapt_episodes,
    each_task,
    parameters_of,
    resolve_strategy,
    with_parameters,
)


class Reptile(MetaAlgorithm):
    def __init__(
        self,
        model: Backbone,
        task: Task,
        *,
        inner_lr: float = 0.02,  # SGD step size on a task, in training and at test
        inner_steps: int = 5,  # k: full-batch SGD steps on each meta-train task
        outer_lr: float = 0.5,  # epsilon: fraction of the way from theta towards mean phi_i
        meta_batch_size: int = 5,  # tasks per meta-update
        # SGD steps on the support set at meta-val/meta-test. More than in training, as in
        # the paper; measured after meta-training an MLP (MSE on sinusoid, accuracy on
        # digits 5-way 1-shot): 1 step 1.48 / 0.39, 10 steps 0.51 / 0.63, 20 steps
        # 0.41 / 0.64, 100 steps 0.34 / 0.66: 20 gets most of the gain at 1/5 of the cost.
        eval_steps: int = 20,
        strategy: Strategy = "auto",  # episodes vmapped or looped; "auto": a fixed rule
    ) -> None:
        super().__init__(model, task)
        self.inner_lr = inner_lr
        self.inner_steps = inner_steps
        self.outer_lr = outer_lr
        self.eval_steps = eval_steps
        self.strategy: Strategy = strategy
        self.tasks_per_step = meta_batch_size

    @classmethod
    def search_space(cls):
        return {
            "inner_lr": Float(1e-3, 0.5, log=True),
            "inner_steps": Int(2, 20),  # k = 1 would be joint training, not meta-learning
            "outer_lr": Float(0.05, 1.0, log=True),
            "meta_batch_size": Categorical((1, 5, 10)),
            "eval_steps": Int(5, 100, log=True),
        }

    def meta_step(self, batch: Episodes) -> float:
        # The task's examples, support and query together: (tasks, n_support + n_query, ...)
        x = torch.cat([batch.support_x, batch.query_x], 1)
        y = torch.cat([batch.support_y, batch.query_y], 1)
        theta = parameters_of(self.model)
        strategy = resolve_strategy(self.model, self.strategy, first_order=True,
                                    meta_gradient=False)

        def predict(xi: Tensor) -> Tensor:
            return functional_call(self.model, theta, (xi,))

        def train(xi: Tensor, yi: Tensor) -> Params:
            # autograd.grad in the loop: cheaper there, and it may write BatchNorm's running
            # statistics, which a torch.func.grad transform refuses.
            return adapt(self.model, theta, xi, yi, self.task.loss, steps=self.inner_steps,
                         lr=self.inner_lr, first_order=True, autograd=strategy == "loop")

        with torch.no_grad():
            # Before adaptation, for the log (a training-mode pass: it updates BatchNorm
            # running statistics like the inner steps' passes, which follow).
            loss = self.task.loss(each_task(predict, x, strategy=strategy), y)
            phi = each_task(train, x, y, strategy=strategy)  # {name: (tasks, *shape)}
            for name, p in theta.items():
                p.add_(phi[name].mean(0) - p, alpha=self.outer_lr)
        return loss.item()

    def adapt_and_predict(self, episodes: Episodes) -> Tensor:
        with torch.no_grad():  # plain SGD on the support set: no graph to the meta-parameters
            return adapt_episodes(
                self.model,
                episodes,
                self.task.loss,
                steps=self.eval_steps,
                lr=self.inner_lr,
                first_order=True,
                strategy=self.strategy,
            )

    def adapted_module(self, support_x: Tensor, support_y: Tensor) -> nn.Module:
        """A copy of the model holding the parameters ``eval_steps`` SGD steps reach on this
        support set (as :meth:`adapt_and_predict` takes them)."""
        strategy = resolve_strategy(self.model, self.strategy, first_order=True)
        theta = parameters_of(self.model)

        def one(sx: Tensor, sy: Tensor) -> Params:
            return adapt(self.model, theta, sx, sy, self.task.loss, steps=self.eval_steps,
                         lr=self.inner_lr, first_order=True, autograd=strategy == "loop")

        with torch.no_grad():
            fast = each_task(one, support_x[None], support_y[None], strategy=strategy)
        return with_parameters(self.model, fast)
