"""Gradient-based meta-learners: the base of MAML, ANIL, Meta-SGD and their variants.

:class:`GradientMetaLearner` meta-learns an initialisation ``theta`` from which a few SGD
steps on an episode's support set fit that episode (Finn et al. 2017, "Model-Agnostic
Meta-Learning for Fast Adaptation of Deep Networks", arXiv:1703.03400, eq. 1):

    minimise over theta   mean over tasks of   L_query(theta - alpha * grad L_support(theta))

with the inner step repeated ``inner_steps`` times and the meta-gradient taken through
those steps (second order) unless ``first_order`` (FOMAML). The known variants differ in
two choices, each a class attribute here:

* **which parameters the inner loop adapts** (:attr:`GradientMetaLearner.adapt_only`):
  all of them (MAML); the head only, :func:`head_only` (ANIL: Raghu et al. 2020, "Rapid
  Learning or Feature Reuse?", arXiv:1909.09157); the body only, :func:`body_only`
  (BOIL: Oh et al. 2021, "BOIL: Towards Representation Change for Few-shot Learning",
  arXiv:2008.08882). The outer loop always updates every parameter.
* **whether the inner step size is learned** (:attr:`GradientMetaLearner.learn_inner_lr`):
  a fixed scalar alpha (MAML), or one learned rate per parameter entry, trained by the
  outer loop with theta (Meta-SGD: Li et al. 2017, arXiv:1707.09835).

A BOIL-style algorithm is therefore one line::

    class BOIL(GradientMetaLearner):
        adapt_only = staticmethod(body_only)

The inner loop itself (functional parameters, vmap or a loop over episodes, BatchNorm's
running statistics) is :mod:`autometa.inner_loop`'s; this module only drives it.

**Parameter-efficient adaptation** (``adapter="lora"``, :mod:`autometa.adapters`): LoRA
adapters (Hu et al. 2021, arXiv:2106.09685) are added to the features and every other
parameter of the features is frozen. Both loops then update only the adapters and the
head: the inner loop adapts the parameters that are both trained and chosen by
:attr:`~GradientMetaLearner.adapt_only` (MAML: adapters and head; ANIL: the head, with the
outer loop on adapters and head; BOIL: the adapters), Adam holds the trained parameters
only, and Meta-SGD learns rates for the inner loop's parameters only. Both inner-loop
strategies serve peft's layers (``vmap`` and ``loop`` give the same meta-gradients).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from autometa import stacked
from autometa.adapters import Adapter, LoraTargets, add_lora, check_adapter, lora_incompatibility
from autometa.algorithm import MetaAlgorithm
from autometa.errors import ConfigError
from autometa.inner_loop import (
    Strategy,
    adapt,
    adapt_episodes,
    each_task,
    meta_backward,
    parameters_of,
    resolve_strategy,
    with_parameters,
)
from autometa.source_model import Backbone
from autometa.task import Episodes, Task

__all__ = ["GradientMetaLearner", "body_only", "head_only"]


def head_only(name: str) -> bool:
    """Whether ``name`` is a parameter of a :class:`~autometa.source_model.Backbone`'s head.

    A Backbone's parameter names start with ``"features."`` (the body) or ``"head."`` (the
    last layer, mapping features to outputs). Adapting the head only is ANIL's inner loop
    (Raghu et al. 2020, arXiv:1909.09157).
    """
    return name.startswith("head.")


def body_only(name: str) -> bool:
    """Whether ``name`` is a parameter of a Backbone's body (``features``): the complement of
    :func:`head_only`.

    Adapting the body only is BOIL's inner loop (Oh et al. 2021, "BOIL: Towards
    Representation Change for Few-shot Learning", arXiv:2008.08882): the head stays at its
    meta-learned value within an episode, so adaptation has to change the representation.
    """
    return not head_only(name)


class GradientMetaLearner(MetaAlgorithm):
    """Base of MAML-style meta-learners: SGD inner loop, Adam outer loop on the query loss.

    Life cycle (the engine's, :mod:`autometa.algorithm`):

    1. ``__init__`` stores the hyperparameters, creates the learned step sizes if
       :attr:`learn_inner_lr`, and one Adam optimizer over the model's parameters (then the
       learned rates, in that order).
    2. :meth:`meta_step` on a meta-batch of ``meta_batch_size`` episodes: zero the
       gradients, adapt to each support set and back-propagate the mean query loss
       (:func:`autometa.inner_loop.meta_backward`, through the inner steps unless
       ``first_order``), one Adam step.
    3. :meth:`adapt_and_predict` on evaluation episodes: the same inner loop, first order
       and under ``torch.no_grad()`` (no graph back to theta is kept); the meta-learned
       parameters and rates are not changed.
    4. :meth:`state_dict` holds the model and, if learned, the step sizes.

    Shapes: episodes as :class:`~autometa.task.Episodes` (``support_x`` (tasks, n_support,
    *input_shape), ...); predictions (tasks, n_query, output_size).

    What a subclass overrides:

    * :attr:`adapt_only` to choose the adapted parameters, wrapped in ``staticmethod``
      (a plain function in a class body would become a method): ``adapt_only =
      staticmethod(head_only)``;
    * :attr:`learn_inner_lr` to learn per-entry step sizes (Meta-SGD); with
      :attr:`adapt_only` too, rates exist for the adapted parameters only (a head-only
      Meta-SGD learns the head's rates);
    * :meth:`search_space` to declare which hyperparameters to search (default: none, so
      the search runs the constructor's defaults);
    * ``__init__`` only to rename or re-default hyperparameters, passing them on to this
      one: the engine reads hyperparameters from the constructor's signature;
    * :meth:`inner_loop_options` to change what the inner loop is given (e.g. more steps
      at evaluation, where ``first_order`` is True).

    Args:
        model: the network to meta-train, on the run's device.
        task: the task; its ``loss`` is the inner and the outer loss.
    """

    #: Which named parameters the inner loop adapts (None: all). The others keep their
    #: meta-learned value within an episode and still receive a meta-gradient.
    adapt_only: Callable[[str], bool] | None = None
    #: Learn one inner step size per entry of each adapted parameter (Meta-SGD),
    #: initialised to ``inner_lr`` and trained by the outer Adam with the model.
    learn_inner_lr: ClassVar[bool] = False

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
        adapter: Adapter = "none",  # "lora": train LoRA adapters and the head, features frozen
        lora_rank: int = 8,  # r of LoRA's update (alpha / r) B A (adapter "lora")
        lora_alpha: float = 16.0,  # alpha of LoRA's update (adapter "lora")
        lora_targets: LoraTargets = "attention",  # "attention" (q/k/v projections) or "linear"
    ) -> None:
        super().__init__(model, task)
        owner = type(self).__name__.lower()
        check_adapter(owner, adapter, lora_rank, lora_alpha, lora_targets)
        # A float, or with learn_inner_lr the learned rates {parameter name: tensor}.
        self.inner_lr: float | dict[str, Tensor] = inner_lr
        self.inner_steps = inner_steps
        self.first_order = first_order
        self.strategy: Strategy = strategy
        self.tasks_per_step = meta_batch_size
        self.adapter = adapter
        if adapter == "lora":
            trained = add_lora(model, rank=lora_rank, alpha=lora_alpha, targets=lora_targets,
                               owner=owner)
            chosen = type(self).adapt_only
            # An instance attribute: the inner loop adapts what is trained and chosen.
            self.adapt_only = (trained if chosen is None
                               else lambda name: trained(name) and chosen(name))
        # Frozen parameters (LoRA's base weights) get no gradient: Adam holds the others.
        meta_params: list[Tensor] = [p for p in model.parameters() if p.requires_grad]
        if self.learn_inner_lr:
            # One rate per entry of each parameter the inner loop adapts (adapt_only), on
            # its device and dtype. A plain dict, not an nn.ParameterDict: parameter names
            # contain dots.
            self.inner_lr = {
                name: torch.full_like(p, inner_lr, requires_grad=True)
                for name, p in model.named_parameters()
                if self.adapt_only is None or self.adapt_only(name)
            }
            meta_params += self.inner_lr.values()
        self.optimizer = torch.optim.Adam(meta_params, lr=meta_lr)

    @classmethod
    def model_incompatibility(cls, model: Backbone, settings: Mapping[str, Any]) -> str | None:
        """With ``adapter="lora"``: no choice of ``lora_targets`` selects a layer of the
        network's features (:func:`autometa.adapters.lora_incompatibility`)."""
        return lora_incompatibility(cls.__name__.lower(), model, settings)

    def inner_loop_options(self, first_order: bool | None = None) -> dict[str, Any]:
        """The keywords given to :mod:`autometa.inner_loop`'s functions.

        ``steps``, ``lr`` (the float, or the learned rates), ``first_order``,
        ``adapt_only`` and ``strategy``: the keywords of
        :func:`~autometa.inner_loop.adapt_and_predict`. Called by :meth:`meta_step` (with
        the ``first_order`` hyperparameter) and :meth:`adapt_and_predict` (with True); not
        meant to be called from outside. Override it to change what the inner loop runs.

        Args:
            first_order: whether the meta-gradient ignores second-order terms; default
                the ``first_order`` hyperparameter.
        """
        if first_order is None:
            first_order = self.first_order
        return {"steps": self.inner_steps, "lr": self.inner_lr, "first_order": first_order,
                "adapt_only": self.adapt_only, "strategy": self.strategy}

    def meta_step(self, batch: Episodes) -> float:
        # A small perceptron's whole step, Adam's too, on one thread (stacked.threads_for).
        with stacked.threads_for(self.model, batch.support_x, batch.query_x):
            self.optimizer.zero_grad(set_to_none=True)
            loss = self._meta_gradient(batch)
            self.optimizer.step()
        return loss

    def _meta_gradient(self, batch: Episodes) -> float:
        """The query loss after adaptation, back-propagated through the inner steps."""
        try:
            loss = meta_backward(self.model, batch, self.task.loss, **self.inner_loop_options())
        except RuntimeError as exc:
            # PyTorch's fused attention kernels (transformers' default "sdpa") have no
            # double backward, which a second-order meta-gradient needs.
            if "scaled_dot_product" in str(exc) and "not implemented" in str(exc):
                raise ConfigError(
                    f"{type(self).__name__.lower()}: a second-order meta-gradient through "
                    "fused scaled-dot-product attention is not implemented in PyTorch; set "
                    "first_order=True, or load the model with attn_implementation='eager' "
                    "(the transformers source's default, transformers.attention=eager)"
                ) from exc
            raise
        return loss

    def adapt_and_predict(self, episodes: Episodes) -> Tensor:
        # torch.func.grad ignores an outer no_grad: the inner steps still see gradients,
        # but no graph back to the meta-parameters is kept.
        with torch.no_grad():
            return adapt_episodes(self.model, episodes, self.task.loss,
                                  **self.inner_loop_options(first_order=True))

    def adapted_module(self, support_x: Tensor, support_y: Tensor) -> nn.Module:
        """A copy of the model holding the parameters the inner loop reaches on this support
        set (by the strategy :meth:`adapt_and_predict` uses): what it predicts for a query
        set after adapting on it."""
        options = self.inner_loop_options(first_order=True)
        strategy = resolve_strategy(self.model, options.pop("strategy"), first_order=True)
        params = parameters_of(self.model)

        def one(sx: Tensor, sy: Tensor) -> dict[str, Tensor]:
            return adapt(self.model, params, sx, sy, self.task.loss,
                         autograd=strategy == "loop", **options)

        with torch.no_grad():
            fast = each_task(one, support_x[None], support_y[None], strategy=strategy)
        return with_parameters(self.model, fast)

    def state_dict(self) -> dict[str, Any]:
        """``{"model": ...}``, plus ``"inner_lr": {name: tensor}`` if the rates are learned."""
        state = super().state_dict()
        if isinstance(self.inner_lr, dict):
            state["inner_lr"] = {name: lr.detach().clone() for name, lr in self.inner_lr.items()}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output.

        Raises:
            KeyError: learned rates saved for parameters other than the model's.
        """
        super().load_state_dict(state)
        if not isinstance(self.inner_lr, dict):
            return
        if state["inner_lr"].keys() != self.inner_lr.keys():
            raise KeyError(
                f"{type(self).__name__} state has learned rates for "
                f"{sorted(state['inner_lr'])}, this model adapts {sorted(self.inner_lr)}: was "
                "it saved for another model?"
            )
        with torch.no_grad():  # in place: the optimizer keeps its references to the rates
            for name, lr in self.inner_lr.items():
                lr.copy_(state["inner_lr"][name])
