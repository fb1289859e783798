"""P>M>F: Pre-training, then Meta-training (ProtoNet), then Fine-tuning on each episode.

Hu, Li, Stühmer, Kim and Hospedales 2022, "Pushing the Limits of Simple Pipelines for
Few-Shot Learning: External Data and Fine-Tuning Make a Difference" (CVPR,
arXiv:2204.07305; code: github.com/hushell/pmf_cvpr22, ``models/protonet.py``,
``models/deploy.py``, ``test_bscdfsl.py``).

* **P**: the source model (``pretrained``, ``transformers``, ``checkpoint``, ...) is the
  pretrained backbone; its ``features`` are used, its ``head`` never.
* **M** (``meta_step``): ProtoNet episodes (Snell et al. 2017): prototypes are the class
  means of the support features, a query's logits come from its distance to them, and the
  query cross-entropy is minimised with Adam at ``meta_lr``. ``distance="cosine"`` is their
  code's classifier: ``scale * (cos(query, prototype) + bias)`` with a learnable ``scale``
  (10 at the start) and ``bias`` (0), meta-trained with the backbone;
  ``"euclidean"`` is Snell et al.'s negative squared distance, no parameter. Their code
  meta-trains with AdamW (weight decay 0.05) and a cosine schedule from 5e-5 (CIFAR-FS)
  or 5e-4 (Meta-Dataset); here Adam at a constant ``meta_lr``, 5e-5 by default, one
  episode per step as theirs. ``meta_train=False`` is their "P>F": the engine skips
  meta-training for the trial (``meta_trains`` is set per instance).
* **F** (``adapt_and_predict``): for each episode, a copy of the whole backbone
  (``torch.func.functional_call`` on cloned parameters, the model untouched) takes
  ``finetune_steps`` full-batch Adam steps (their ``ProtoNet_Finetune``: betas 0.9/0.999,
  no weight decay, 50 steps) on the support set's ProtoNet loss, the prototypes
  recomputed from the support set itself at every step; ``scale`` and ``bias`` stay fixed
  (their optimiser holds the backbone's parameters only). The query set is then classified
  against the fine-tuned support prototypes. Every episode is fitted alone, one after the
  other, with nothing random: predictions depend neither on how the engine chunks episodes
  nor on torch's global generator. Learning rate 0 skips fine-tuning: ProtoNet's inference.
  Their code augments the support queries with DiffAugment (colour and translation, with
  probability 0.9) at each step; left out here (it would need a per-episode seeded
  generator, and it is image-specific), so the support set is its own query set.
* **The learning rate** is chosen per target, as their ``test_bscdfsl.py`` does (lr in
  {0, 1e-4, 5e-4, 1e-3} there, {0, 1e-4, 1e-3, 1e-2} in the paper's Meta-Dataset table;
  a few episodes with labelled queries, "3-5 episodes ... is sufficient", their README):
  the first ``select_episodes`` episodes of ``task.meta_val()`` (a target dataset's
  validation split, or episodes of the meta-val classes) are fine-tuned with each
  candidate of ``finetune_lrs`` and the best mean score wins; ties go to the smaller lr,
  so lr 0 (plain ProtoNet) wins ties, as their strict ``>`` in ascending order does. The
  steps are not chosen this way but searched (``finetune_steps``): each candidate step
  count would multiply the choice's cost. The choice is made at the first
  ``adapt_and_predict`` after a ``meta_step`` (so again at every meta-val evaluation),
  logged, exposed as :attr:`PMF.finetune_lr` and :attr:`PMF.selection`, and saved in
  ``state_dict``: a restored trial predicts with the same lr. Bias: those episodes are
  also scored in the trial's meta-val mean (slightly optimistic, as any choice made on
  them is); meta-test episodes are never used.

BatchNorm: the backbone is in eval mode while fine-tuning (their evaluation runs under
``model.eval()``). A BatchNorm with running statistics then normalises with the
meta-trained statistics and leaves them unchanged (only weights and affine parameters are
fine-tuned); conv4's BatchNorm has none and normalises every batch it sees with that
batch's statistics: the support set during fine-tuning, then the support and the query
sets each as a batch of its own, as ProtoNet embeds them. Dropout is off.

Cost: one fine-tuning step is a forward and backward pass of the support set. Measured on
the busy 2-core CPU this was written on (one thread), conv4 (64 channels), glyphs 28x28,
5-way 1-shot 15 queries: 0.75 to 1.5 s per episode for 50 steps (against 6 to 8 ms per
episode at lr 0), so 10 to 20 minutes for the engine's default 100 meta-val and 600
meta-test episodes once a positive lr is chosen, plus the choice itself:
``select_episodes`` times the positive candidates (5 x 3 = 15 fine-tunings, 11 to 22 s)
at every meta-val evaluation (the trial's ``adapt_ms`` includes it). A ViT's episode costs
far more: narrow ``finetune_lrs`` (e.g. ``[0, 1e-4]``) or lower ``select_episodes``
while searching.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from autometa import Backbone, Categorical, ConfigError, Episodes, Float, MetaAlgorithm, Task

log = logging.getLogger(__name__)

Distance = Literal["cosine", "euclidean"]
DISTANCES = ("cosine", "euclidean")
#: Their cosine classifier's learnable scale at the start (``ProtoNet.scale_cls``).
SCALE_INIT = 10.0
#: The paper's grid of fine-tuning learning rates; 0 is no fine-tuning.
PAPER_LRS = (0.0, 1e-4, 1e-3, 1e-2)


def class_prototypes(support: Tensor, support_y: Tensor, ways: int) -> tuple[Tensor, Tensor]:
    """Class means of the support features (Snell et al. 2017, eq. 1).

    Shapes: ``support`` (tasks, n_support, d), ``support_y`` (tasks, n_support) int64 ->
    prototypes (tasks, ways, d) and shots per class (tasks, ways); a class absent from a
    support set has a zero prototype and a count of 0.
    """
    one_hot = F.one_hot(support_y, ways).to(support.dtype)  # (tasks, n_support, ways)
    counts = one_hot.sum(1)  # (tasks, ways)
    sums = one_hot.transpose(1, 2) @ support  # (tasks, ways, d)
    return sums / counts.clamp(min=1).unsqueeze(-1), counts


def prototype_logits(query: Tensor, prototypes: Tensor, counts: Tensor, distance: str,
                     scale: Tensor | None = None, bias: Tensor | None = None) -> Tensor:
    """Logits of each query for each class: (tasks, n_query, d) -> (tasks, n_query, ways).

    ``"euclidean"``: minus the squared distance to each prototype (Snell et al., eq. 2).
    ``"cosine"``: ``scale * (cos + bias)``, pmf's ``ProtoNet.cos_classifier`` (scale 1 and
    bias 0 if not given). Classes absent from the support set (``counts`` 0) get the
    dtype's lowest value: never predicted, no gradient.
    """
    if distance == "cosine":
        cos = F.normalize(query, dim=-1) @ F.normalize(prototypes, dim=-1).transpose(1, 2)
        logits = cos if bias is None else cos + bias
        logits = logits if scale is None else scale * logits
    else:
        # -|q - c|^2 = -|q|^2 + 2 q.c - |c|^2: no (tasks, n_query, ways, d) difference tensor.
        logits = (2 * query @ prototypes.transpose(1, 2)
                  - query.pow(2).sum(-1, keepdim=True)
                  - prototypes.pow(2).sum(-1).unsqueeze(1))
    absent = (counts == 0).unsqueeze(1)  # (tasks, 1, ways)
    return logits.masked_fill(absent, torch.finfo(logits.dtype).min)


class PMF(MetaAlgorithm):
    kinds = frozenset({"classification"})
    # Fine-tuning the whole backbone on every evaluation episode (about 1 s per episode for
    # a conv4 on a CPU, 100 meta-val episodes per evaluation): run when named, not by default.
    searched_by_default = False

    def __init__(
        self,
        model: Backbone,
        task: Task,
        *,
        meta_lr: float = 5e-5,  # Adam step size of meta-training (their CIFAR-FS lr)
        meta_train: bool = True,  # False: "P>F", the engine skips meta-training
        distance: Distance = "cosine",  # their learnable-scale cosine, or squared Euclidean
        finetune_steps: int = 50,  # Adam steps per support set (the paper: 50)
        finetune_lrs: Sequence[float] = PAPER_LRS,  # candidates; 0: no fine-tuning
        select_episodes: int = 5,  # labelled meta-val episodes that choose the lr
    ) -> None:
        super().__init__(model, task)
        reason = self.incompatibility(task)
        if reason:
            raise ConfigError(f"pmf {reason}")
        if distance not in DISTANCES:
            raise ConfigError(f"pmf.distance: {distance!r} is not one of 'cosine', 'euclidean'")
        if not any(True for _ in model.features.parameters()):
            raise ConfigError("pmf meta-trains and fine-tunes the source model's features, "
                              "and these have no parameters (the raw inputs); use a network "
                              "(conv4, pretrained, transformers, ...)")
        for name, count in (("finetune_steps", finetune_steps),
                            ("select_episodes", select_episodes)):
            if isinstance(count, bool) or not isinstance(count, int) or count < 1:
                raise ConfigError(f"pmf.{name}: expected a positive integer, got {count!r}")
        lrs = list(finetune_lrs) if isinstance(finetune_lrs, Sequence) else []
        if not lrs or not all(isinstance(lr, int | float) and not isinstance(lr, bool)
                              and math.isfinite(lr) and lr >= 0 for lr in lrs):
            raise ConfigError(f"pmf.finetune_lrs: expected a list of learning rates >= 0, "
                              f"got {finetune_lrs!r}; e.g. [0, 1e-4, 1e-3, 1e-2]")
        self.meta_trains = meta_train
        self.distance: Distance = distance
        self.finetune_steps = finetune_steps
        self.finetune_lrs: tuple[float, ...] = tuple(sorted({float(lr) for lr in lrs}))
        self.select_episodes = select_episodes
        dtype = next(model.parameters()).dtype
        # Their cosine classifier's parameters: meta-trained, fixed while fine-tuning.
        self.scale = nn.Parameter(torch.tensor(SCALE_INIT, dtype=dtype, device=task.device))
        self.bias = nn.Parameter(torch.zeros((), dtype=dtype, device=task.device))
        trained = [*model.features.parameters()]
        if distance == "cosine":
            trained += [self.scale, self.bias]
        self.optimizer = torch.optim.Adam(trained, lr=meta_lr)
        self._lr: float | None = None  # the chosen fine-tuning lr (None: not chosen yet)
        self._selection: dict[float, float] = {}

    @classmethod
    def search_space(cls):
        # meta_lr: two decades below and one above their 5e-4 (Meta-Dataset); the steps
        # around the paper's 50 (their README also tries 100); each doubles the cost.
        return {
            "meta_lr": Float(1e-5, 1e-2, log=True),
            "meta_train": Categorical((True, False)),
            "finetune_steps": Categorical((20, 50, 100)),
            "distance": Categorical(DISTANCES),
        }

    @property
    def finetune_lr(self) -> float | None:
        """The fine-tuning learning rate in use: chosen on labelled meta-val episodes at the
        first ``adapt_and_predict`` after meta-training, or restored by
        ``load_state_dict``; None before."""
        return self._lr

    @property
    def selection(self) -> dict[float, float]:
        """``{candidate lr: mean metric on the selection episodes}`` of the last choice
        (empty before one, or when there is a single candidate)."""
        return dict(self._selection)

    @classmethod
    def model_incompatibility(cls, model: Backbone, settings: Mapping[str, Any]) -> str | None:
        if not any(True for _ in model.features.parameters()):
            return ("pmf meta-trains and fine-tunes the source model's features, which have "
                    "no parameters (the raw inputs); use a network (conv4, pretrained, "
                    "transformers, ...)")
        return None

    def meta_step(self, batch: Episodes) -> float:
        features = self.model.features
        support = torch.stack([features(x).flatten(1) for x in batch.support_x])
        query = torch.stack([features(x).flatten(1) for x in batch.query_x])
        loss = self.task.loss(self._logits(support, batch.support_y, query), batch.query_y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self._lr = None  # the model changed: choose again
        self._selection = {}
        return loss.item()

    def adapt_and_predict(self, episodes: Episodes) -> Tensor:
        # Eval mode: BatchNorm running statistics used, never updated; dropout off.
        training = self.model.training
        self.model.eval()
        try:
            if self._lr is None:
                self._choose()
            assert self._lr is not None
            return self._predict(episodes, self._lr)
        finally:
            self.model.train(training)

    def _logits(self, support: Tensor, support_y: Tensor, query: Tensor) -> Tensor:
        """(tasks, n_support, d), (tasks, n_support), (tasks, n_query, d) -> logits."""
        prototypes, counts = class_prototypes(support, support_y, self.task.output_size)
        return prototype_logits(query, prototypes, counts, self.distance, self.scale,
                                self.bias)

    def _predict(self, episodes: Episodes, lr: float) -> Tensor:
        """Logits (tasks, n_query, output_size) after fine-tuning each episode at ``lr``."""
        if lr == 0:  # ProtoNet's inference: no copy, no gradient
            features = self.model.features
            with torch.no_grad():
                support = torch.stack([features(x).flatten(1) for x in episodes.support_x])
                query = torch.stack([features(x).flatten(1) for x in episodes.query_x])
                return self._logits(support, episodes.support_y, query)
        return torch.stack([self._finetune(episodes.support_x[t], episodes.support_y[t],
                                           episodes.query_x[t], lr)
                            for t in range(len(episodes))])

    def _finetune(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, lr: float
                  ) -> Tensor:
        """Fine-tune a copy of the backbone on one support set; its query logits.

        Shapes: ``support_x`` (n_support, *in), ``support_y`` (n_support,), ``query_x``
        (n_query, *in) -> (n_query, output_size).
        """
        features = self.model.features
        # A copy of the trainable parameters; frozen ones and buffers come from the model.
        params = {n: p.detach().clone().requires_grad_()
                  for n, p in features.named_parameters() if p.requires_grad}
        optimizer = torch.optim.Adam(params.values(), lr=lr)  # theirs: betas 0.9/0.999, no decay
        scale, bias = self.scale.detach(), self.bias.detach()
        y = support_y.unsqueeze(0)  # (1, n_support): one episode

        def embed(x: Tensor) -> Tensor:  # (n, *in) -> (1, n, d)
            return functional_call(features, params, (x,)).flatten(1).unsqueeze(0)

        def logits(support: Tensor, query: Tensor) -> Tensor:
            prototypes, counts = class_prototypes(support, y, self.task.output_size)
            return prototype_logits(query, prototypes, counts, self.distance, scale, bias)

        with torch.enable_grad():  # the engine evaluates under no_grad at times
            for _ in range(self.finetune_steps):
                optimizer.zero_grad(set_to_none=True)
                support = embed(support_x)  # the support set is its own query set
                self.task.loss(logits(support, support), y).backward()
                optimizer.step()
        with torch.no_grad():
            return logits(embed(support_x), embed(query_x))[0]

    def _choose(self) -> None:
        """Choose the fine-tuning lr on the first ``select_episodes`` meta-val episodes."""
        if len(self.finetune_lrs) == 1:
            self._lr, self._selection = self.finetune_lrs[0], {}
            return
        metric = self.task.metric
        val = self.task.meta_val()
        # One episode at a time: a mixed set's episodes may differ in size.
        chosen = [val[i : i + 1] for i in range(min(self.select_episodes, len(val)))]
        worst = -math.inf if metric.direction == "maximize" else math.inf
        scores: dict[float, float] = {}
        for lr in self.finetune_lrs:  # ascending
            total = 0.0
            for episode in chosen:
                assert isinstance(episode, Episodes)
                pred = self._predict(episode, lr)
                if not bool(torch.isfinite(pred).all()):  # diverged at this lr: never chosen
                    total = worst
                    break
                total += float(metric(pred, episode.query_y).double().sum())
            scores[lr] = total / len(chosen)
        best = self.finetune_lrs[0]
        for lr in self.finetune_lrs[1:]:
            if metric.better(scores[lr], scores[best]):  # strictly: ties keep the smaller lr
                best = lr
        self._lr, self._selection = best, scores
        log.info("pmf: fine-tuning lr %g chosen on %d labelled meta-val episodes (mean %s "
                 "by lr: %s)", best, len(chosen), metric.name,
                 ", ".join(f"{lr:g}: {s:.4f}" for lr, s in scores.items()))

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"model": self.model.state_dict(),
                                 "scale": self.scale.detach().clone(),
                                 "bias": self.bias.detach().clone()}
        if self._lr is not None:  # the choice, so that a restored trial predicts the same
            state["finetune_lr"] = torch.tensor(self._lr, dtype=torch.float64)
            state["selection"] = torch.tensor(list(self._selection.items()),
                                              dtype=torch.float64).reshape(-1, 2)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        with torch.no_grad():
            self.scale.copy_(state["scale"])
            self.bias.copy_(state["bias"])
        # A state saved before any choice leaves it to the next adapt_and_predict.
        self._lr = float(state["finetune_lr"]) if "finetune_lr" in state else None
        self._selection = ({float(lr): float(s) for lr, s in state["selection"].tolist()}
                           if "selection" in state else {})
