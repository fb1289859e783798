"""The MAML workloads the speed, memory and inner-loop benchmarks share.

* ``sinusoid``: the MAML paper's 1-40-40-1 ReLU MLP (autometa's ``mlp`` source, hidden 40,
  2 layers), meta-batch 25, 10 shots, 10 queries, inner lr 0.01;
* ``conv4``: autometa's ``conv4`` source (64 channels) on 5-way 1-shot 15-query episodes of
  random 1x28x28 images, meta-batch 32, inner lr 0.4 (MAML's Omniglot setting), sampled
  from an :class:`autometa.episodes.ClassPool` of 1,000 classes x 20 images.

:func:`make_autometa` builds autometa's ``maml`` plugin on a workload as a trial does.
Both workloads live on one torch device (``make_workload(device=...)``, default the CPU):
the task's data and its episodes, and so every contender's model (built on the task's
device, as a trial builds it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from autometa import Episodes, Task, create_host
from autometa.episodes import ClassPool
from autometa.study.trials import TrialPlan
from autometa.trial import build

#: The Adam meta-learning rate of every contender.
META_LR = 1e-3
class RandomImages(Task):
    """N-way K-shot episodes of random images from a :class:`ClassPool` (timing only)."""

    kind = "classification"

    def __init__(self, *, classes: int = 1000, per_class: int = 20, side: int = 28,
                 ways: int = 5, shots: int = 1, queries: int = 15, seed: int = 0,
                 device: torch.device | str = "cpu") -> None:
        super().__init__(seed=seed, device=device)
        self.input_shape = (1, side, side)
        self.output_size = ways
        self.ways, self.shots, self.queries = ways, shots, queries
        g = torch.Generator().manual_seed(seed)
        x = torch.rand(classes * per_class, 1, side, side, generator=g)  # (n, 1, H, W)
        y = torch.arange(classes).repeat_interleave(per_class)
        # On the device: the pool's indices and random draws live where its images do.
        self.pool = ClassPool(x.to(self.device), y, range(classes), name="random images")
        self._fixed = self.sample(2, torch.Generator(self.device).manual_seed(seed + 1))

    def sample(self, n_tasks: int, generator: torch.Generator) -> Episodes:
        return self.pool.sample(n_tasks, self.ways, self.shots, self.queries, generator)

    def meta_val(self) -> Episodes:
        return self._fixed

    def meta_test(self) -> Episodes:
        return self._fixed


@dataclass
class Workload:
    """A model, a task and the MAML settings that the contenders share."""

    name: str
    task: Task
    source: str
    source_params: dict[str, Any]
    meta_batch: int
    inner_lr: float
    regression: bool

    def loss(self, pred: Tensor, target: Tensor) -> Tensor:
        """The task's loss, written out so that the peers do not depend on autometa."""
        if self.regression:
            return F.mse_loss(pred, target)
        return F.cross_entropy(pred, target)

    @property
    def device(self) -> torch.device:
        """Where the task's data, its episodes and the contenders' models live."""
        return self.task.device

    def batches(self, n: int, seed: int = 0) -> list[Episodes]:
        g = torch.Generator(self.device).manual_seed(seed)
        return [self.task.sample(self.meta_batch, g) for _ in range(n)]


def make_workload(name: str, *, channels: int = 64, meta_batch: int | None = None,
                  pool_classes: int = 1000, side: int = 28,
                  device: torch.device | str = "cpu") -> Workload:
    """``sinusoid`` (MLP 1-40-40-1) or ``conv4`` (random 28x28 5-way 1-shot 15-query), its
    data on ``device``."""
    if name == "sinusoid":
        task = create_host().get("task", "sinusoid").load()(
            shots=10, queries=10, val_episodes=1, test_episodes=2, device=device)
        return Workload(name, task, "mlp", {"hidden": 40, "layers": 2},
                        meta_batch or 25, 0.01, regression=True)
    if name == "conv4":
        task = RandomImages(classes=pool_classes, side=side, device=device)
        return Workload(name, task, "conv4", {"channels": channels},
                        meta_batch or 32, 0.4, regression=False)
    raise ValueError(f"unknown workload {name!r}; expected 'sinusoid' or 'conv4'")


def make_autometa(work: Workload, inner_steps: int, strategy: str,
                  first_order: bool = False, seed: int = 0) -> Any:
    """autometa's MAML plugin, built the way a trial builds it (``autometa.trial.build``)."""
    plan = TrialPlan("maml", work.source,
                     {"inner_lr": work.inner_lr, "inner_steps": inner_steps, "meta_lr": META_LR,
                      "meta_batch_size": work.meta_batch, "first_order": first_order,
                      "strategy": strategy},
                     work.source_params)
    return build(create_host(), work.task, plan, seed=seed)
