"""Fine-tuning baselines: train on the meta-train data, then fine-tune on each support set.

Classification follows Chen, Liu, Kira, Wang and Huang 2019, "A Closer Look at Few-shot
Classification" (ICLR, arXiv:1904.04232; code: github.com/wyharveychen/CloserLookFewShot):

* **Training stage** (``meta_step``): the features and a temporary classifier over *all*
  meta-train classes (``task.train_classes``, global labels from ``task.sample_labelled``)
  are trained with cross-entropy and Adam (paper, section 4.1: learning rate 1e-3, batches
  of 16). ``head="linear"`` is Baseline, ``head="cosine"`` Baseline++ (see ``heads.py``).
  The episodes the engine passes to ``meta_step`` are not used: they carry per-episode
  labels. Labelled batches come from the algorithm's own generator, seeded from torch's
  global generator when the algorithm is built (so by the trial's seed).
* **Fine-tuning stage** (``adapt_and_predict``): per episode, a new classifier of the same
  type over the episode's ways is trained on the support set's features, the features
  fixed (``finetune="head"``; ``"all"`` fine-tunes them too). Their code: SGD (lr 0.01,
  momentum 0.9, dampening 0.9, weight decay 1e-3) for 100 epochs over the support set in
  shuffled batches of 4 (700 steps for 5-way 5-shot). We take ``finetune_steps``
  deterministic full-batch steps on the whole support set (25 examples for 5-way 5-shot),
  fewer and less noisy updates; ``optimizer`` may also be Adam or L-BFGS, all three
  minimising the support loss plus the weight decay's L2 penalty (see ``fit.py``: how the
  episodes are fitted together, exactly as if alone). All three serve ``"all"`` too, at a
  price on convolutional features: about 0.5 s per episode per 20 steps for a conv4 on a
  2-core CPU, against 3 ms per episode for 100 steps of a head.

  The new classifier starts from the same weights for every episode and every call: drawn
  like ``nn.Linear``'s (as in their code) from a generator seeded with the constant
  ``HEAD_SEED``. Zeros would do for the linear head (softmax regression is convex) but not
  for the cosine one, whose normalisation is singular at zero. So predictions do not
  depend on torch's global generator, on how the engine chunks episodes, or on a state
  round trip; ``state_dict`` is the model's (the training classifier is not needed).

**Parameter-efficient fine-tuning** (``adapter="lora"``, ``autometa.adapters``): LoRA
adapters (Hu et al. 2021, arXiv:2106.09685) are added to the features and the features'
other parameters are frozen. The training stage then trains the adapters and the
temporary classifier (regression: the adapters and the model's head), and
``finetune="all"`` fine-tunes the adapters and the episode's classifier instead of every
parameter; ``finetune="head"`` is unchanged (features, adapters included, fixed).

Regression (no classes to relabel) keeps the "pretrained" baseline of Finn et al. 2017:
meta-training pools the support and query examples of ``batch_tasks`` sampled episodes
into one supervised batch (Adam, ``lr``); adaptation fine-tunes a copy of the trained model
(its own head, ``finetune="head"``, or all of it, ``"all"``) on each support set, with the
same optimizers (the default fine-tunes the head, as for classification; fine-tuning
everything fits sinusoids better). ``finetune="all", finetune_steps=10, momentum=0,
weight_decay=0`` is the plain SGD adaptation this plugin had before it classified.
``head`` and ``batch_size`` concern classification only (a search over a regression task
leaves them out of its space), ``batch_tasks`` regression only.

Search ranges: ``lr`` one decade either side of the paper's Adam 1e-3; ``batch_size``
around its 16; ``finetune_lr`` from 1e-3 to 0.5 around its SGD 0.01 (Adam too; L-BFGS
ignores it); ``finetune_steps`` 10 to 200 around its 100 iterations, capped at twice that
because every meta-val evaluation fine-tunes on every episode.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from autometa import Backbone, Categorical, ConfigError, Episodes, Float, Int, MetaAlgorithm, Task
from autometa.adapters import (
    LORA_SPACE,
    Adapter,
    LoraTargets,
    add_lora,
    check_adapter,
    lora_incompatibility,
)
from autometa_plugins.finetune.fit import OPTIMIZERS, fit, fit_and_predict
from autometa_plugins.finetune.heads import HEADS, Classifier, logits

#: Seed of the generator that draws every episode's new classifier (the same each time).
HEAD_SEED = 0
FINETUNE = ("head", "all")


class FineTune(MetaAlgorithm):
    kinds = frozenset({"classification", "regression"})

    def __init__(
        self,
        model: Backbone,
        task: Task,
        *,
        lr: float = 1e-3,  # Adam step size of the training stage (paper: 1e-3)
        batch_size: int = 16,  # classification: labelled examples per training step (paper: 16)
        batch_tasks: int = 25,  # regression: meta-train episodes pooled into one batch
        head: str = "linear",  # classification: "linear" (Baseline) or "cosine" (Baseline++)
        optimizer: str = "sgd",  # fine-tuning: "sgd" (momentum 0.9), "adam" or "lbfgs"
        finetune_lr: float = 0.01,  # fine-tuning step size of sgd and adam (paper: 0.01)
        finetune_steps: int = 100,  # fine-tuning iterations per support set (paper: 100)
        finetune: str = "head",  # fine-tune the "head" on fixed features, or "all" parameters
        weight_decay: float = 1e-3,  # fine-tuning weight decay (paper: 1e-3)
        momentum: float = 0.9,  # sgd's momentum, dampened alike (their code: 0.9; 0: plain SGD)
        adapter: Adapter = "none",  # "lora": train LoRA adapters (and heads), features frozen
        lora_rank: int = 8,  # r of LoRA's update (alpha / r) B A (adapter "lora")
        lora_alpha: float = 16.0,  # alpha of LoRA's update (adapter "lora")
        lora_targets: LoraTargets = "attention",  # "attention" (q/k/v projections) or "linear"
    ) -> None:
        super().__init__(model, task)
        check_adapter("finetune", adapter, lora_rank, lora_alpha, lora_targets)
        reason = self.incompatibility(task)
        if reason:
            raise ConfigError(f"finetune {reason}")
        for name, value, choices in (("head", head, HEADS), ("optimizer", optimizer, OPTIMIZERS),
                                     ("finetune", finetune, FINETUNE)):
            if value not in choices:
                raise ConfigError(f"finetune.{name}: {value!r} is not one of "
                                  f"{', '.join(map(repr, choices))}")
        for name, count in (("batch_size", batch_size), ("batch_tasks", batch_tasks),
                            ("finetune_steps", finetune_steps)):
            if isinstance(count, bool) or not isinstance(count, int) or count < 1:
                raise ConfigError(f"finetune.{name}: expected a positive integer, got {count!r}")
        if not 0 <= momentum < 1:
            raise ConfigError(f"finetune.momentum: expected a value in [0, 1), got {momentum!r}")
        self.head = head
        self.optimizer_name = optimizer
        self.finetune_lr = finetune_lr
        self.finetune_steps = finetune_steps
        self.finetune = finetune
        self.weight_decay = weight_decay
        self.momentum = momentum
        self.batch_size = batch_size
        self.classifies = task.kind == "classification"
        self.feature_dim = _feature_dim(model, task)
        self.adapter = adapter
        if adapter == "lora":
            add_lora(model, rank=lora_rank, alpha=lora_alpha, targets=lora_targets,
                     owner="finetune")
        trained: list[nn.Parameter] = list(model.parameters())
        if self.classifies:
            # The temporary classifier over every meta-train class (their code zeroes the
            # linear one's bias), and the generator of the labelled batches.
            self.train_head = Classifier(head, task.train_classes, self.feature_dim,
                                         dtype=_dtype(model)).to(task.device)
            if self.train_head.bias is not None:
                nn.init.zeros_(self.train_head.bias)
            seed = int(torch.randint(2**62, ()))  # from the trial's seeded global generator
            self.generator = torch.Generator(device=task.device).manual_seed(seed)
            trained = [*model.features.parameters(), *self.train_head.parameters()]
            self.tasks_per_step = 1  # the engine's episodes are not used: sample few
        else:
            self.tasks_per_step = batch_tasks
        # With LoRA the features' base weights are frozen: Adam holds the rest.
        self.optimizer = torch.optim.Adam([p for p in trained if p.requires_grad], lr=lr)

    @classmethod
    def search_space(cls, task: Task | None = None):
        # Ranges around the paper's settings; see the module docstring. On a regression
        # task the classifier's settings (head, batch_size) would be searched to no effect.
        space = {
            "lr": Float(1e-4, 1e-2, log=True),
            "batch_size": Categorical((16, 32, 64)),
            "head": Categorical(HEADS),
            "optimizer": Categorical(OPTIMIZERS),
            "finetune_lr": Float(1e-3, 0.5, log=True),
            "finetune_steps": Int(10, 200, log=True),
            "finetune": Categorical(FINETUNE),
            **LORA_SPACE,  # searched only with adapter="lora"
        }
        if task is not None and task.kind == "regression":
            del space["head"], space["batch_size"]
        return space

    @classmethod
    def incompatibility(cls, task: Task) -> str | None:
        reason = super().incompatibility(task)
        if reason is None and task.kind == "classification" and task.train_classes < 1:
            reason = ("trains a classifier over the task's meta-train classes, but the task "
                      "has no labelled meta-train pool (train_classes = 0, no "
                      "sample_labelled)")
        return reason

    @classmethod
    def model_incompatibility(cls, model: Backbone, settings: Mapping[str, Any]) -> str | None:
        return lora_incompatibility("finetune", model, settings)

    def meta_step(self, batch: Episodes) -> float:
        if self.classifies:
            x, y = self.task.sample_labelled(self.batch_size, self.generator)  # (b, *in), (b,)
            loss = F.cross_entropy(self.train_head(self.model.features(x)), y)
        else:
            x = torch.cat([batch.support_x, batch.query_x], 1).flatten(0, 1)  # (tasks*n, *in)
            y = torch.cat([batch.support_y, batch.query_y], 1).flatten(0, 1)
            loss = self.task.loss(self.model(x), y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.item()

    def adapt_and_predict(self, episodes: Episodes) -> Tensor:
        # Eval mode: BatchNorm with running statistics uses (and does not update) them,
        # dropout is off. Conv-4's BatchNorm has none: it normalises each batch it sees.
        training = self.model.training
        self.model.eval()
        try:
            return self._adapt_and_predict(episodes)
        finally:
            self.model.train(training)

    def _adapt_and_predict(self, episodes: Episodes) -> Tensor:
        _, forward, fitted = self._fitted_net()
        if self.finetune == "head":
            support, query = self._embed(episodes.support_x), self._embed(episodes.query_x)
        else:
            support, query = episodes.support_x, episodes.query_x
        return fit_and_predict(forward, fitted, support, episodes.support_y, query,
                               self.task.loss, **self._fit_options())

    def _fitted_net(self) -> tuple[nn.Module, Any, dict[str, Tensor]]:
        """The module fine-tuning fits (a new classifier, or the model's head, on fixed
        features; or the whole network), its functional forward and the parameters fitted."""
        head = self.model.head
        if self.classifies:  # a new classifier over the episode's ways, the same every time
            head = Classifier(self.head, self.task.output_size, self.feature_dim,
                              generator=torch.Generator().manual_seed(HEAD_SEED),
                              dtype=_dtype(self.model)).to(self.task.device)
        net: nn.Module = head if self.finetune == "head" else (
            Backbone(self.model.features, head) if self.classifies else self.model)

        def forward(params: dict[str, Tensor], x: Tensor) -> Tensor:
            if net is head and self.classifies:  # the same as functional_call, cheaper
                return logits(self.head, x, params["weight"], params.get("bias"))
            return functional_call(net, params, (x,))

        # With LoRA, "all" fits the adapters and the head; the frozen weights stay the
        # module's own (functional_call takes the parameters it is not given from it).
        fitted = {n: p for n, p in net.named_parameters()
                  if p.requires_grad or self.adapter == "none"}
        return net, forward, fitted

    def _fit_options(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer_name, "steps": self.finetune_steps,
                "lr": self.finetune_lr, "weight_decay": self.weight_decay,
                "momentum": self.momentum}

    def adapted_module(self, support_x: Tensor, support_y: Tensor) -> nn.Module:
        """A copy of the network with the parameters fine-tuning fits on this support set
        (the new classifier, or the head, or every parameter): what
        :meth:`adapt_and_predict` computes for a query set after adapting on it."""
        training = self.model.training
        self.model.eval()
        try:
            net, forward, init = self._fitted_net()
            head_only = self.finetune == "head"
            support = self._embed(support_x[None])[0] if head_only else support_x
            params = fit(forward, init, support, support_y, self.task.loss,
                         **self._fit_options())
            fitted = copy.deepcopy(net)
            with torch.no_grad():
                for name, value in params.items():
                    fitted.get_parameter(name).copy_(value)
            features = copy.deepcopy(self.model.features) if head_only else None
        finally:
            self.model.train(training)
        out = _Adapted(features, fitted).eval()
        out.requires_grad_(False)
        return out

    def _embed(self, x: Tensor) -> Tensor:
        """Features of each episode's examples, one batch per episode: (tasks, n, d).

        A loop, not vmap: 2x faster for conv4 (BatchNorm), and cheap for an MLP."""
        with torch.no_grad():
            return torch.stack([self.model.features(episode) for episode in x])


class _Adapted(nn.Module):
    """A fine-tuned network: ``net`` on the frozen ``features`` (fine-tuning the head),
    or ``net`` alone (fine-tuning everything). (n, *input_shape) -> (n, output_size)."""

    def __init__(self, features: nn.Module | None, net: nn.Module) -> None:
        super().__init__()
        self.features, self.net = features, net

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x if self.features is None else self.features(x))


def _dtype(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def _feature_dim(model: Backbone, task: Task) -> int:
    """Width of ``model.features``' output, from two blank inputs (in eval mode: no
    BatchNorm statistics change)."""
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            blank = torch.zeros(2, *task.input_shape, dtype=_dtype(model), device=task.device)
            return int(model.features(blank).shape[-1])
    finally:
        model.train(training)
