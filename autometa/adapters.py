"""Parameter-efficient adaptation: LoRA adapters on a Backbone's features, with peft.

LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models",
arXiv:2106.09685) freezes a pretrained weight ``W`` (out, in) and learns a low-rank update
beside it: a targeted layer computes

    W x + (alpha / r) * B A x        A: (r, in), B: (out, r)

with ``A`` drawn like ``nn.Linear``'s weights (Kaiming-uniform) and ``B`` zero, so the
adapted network starts as the pretrained one. Only ``A`` and ``B`` are trained (section
4.1); the paper adapts the attention's query and value projections (section 7.1).

:func:`add_lora` injects the layers with peft (``LoraConfig`` + ``inject_adapter_in_model``,
which works on any ``nn.Module``, in place: the adapters are ordinary ``nn.Parameter``s of
the model, so :mod:`autometa.inner_loop`'s ``torch.func.functional_call`` adapts them like
any other parameter), freezes every other parameter of ``model.features``
(``requires_grad`` False) and leaves the head trainable. It returns
:class:`AdaptedNames`, the predicate of what is trained: the LoRA parameters and the head.

Which layers get an adapter (``targets``):

* ``"attention"``: the query, key and value projections of attention blocks, modules
  whose name ends in ``q_proj``, ``k_proj``, ``v_proj`` (transformers 5's ViT, DINOv2 and
  CLIP vision encoders), ``query``, ``key``, ``value`` (earlier transformers) or ``qkv``
  (timm's fused projection). A convolutional network has none: :class:`ConfigError`.
* ``"linear"``: every ``nn.Linear`` and ``nn.Conv2d`` of the features (so any backbone,
  conv4, ResNet-12 or an MLP, can be adapted).

Initialisation is deterministic given torch's global generator (which the engine seeds per
trial): peft draws ``A`` from it and sets ``B`` to zero. LoRA's dropout is off: it would make
the inner loop's support losses random.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, get_args

from torch import nn

from autometa.errors import ConfigError
from autometa.source_model import Backbone
from autometa.space import Categorical, Float, Int, Param

__all__ = ["ADAPTERS", "LORA_SPACE", "LORA_TARGETS", "AdaptedNames", "Adapter", "LoraTargets",
           "add_lora",
           "check_adapter", "lora_incompatibility", "lora_target_modules"]

#: An algorithm's ``adapter`` setting, and ``lora_targets``'s.
Adapter = Literal["none", "lora"]
LoraTargets = Literal["attention", "linear"]
ADAPTERS: tuple[str, ...] = get_args(Adapter)
LORA_TARGETS: tuple[str, ...] = get_args(LoraTargets)
#: Last parts of the module names of attention's query/key/value projections.
ATTENTION_NAMES = frozenset({"q_proj", "k_proj", "v_proj", "query", "key", "value", "qkv"})
#: The LoRA settings' search space, searched only where ``adapter`` is fixed to ``"lora"``
#: (:mod:`autometa.space`'s conditions): ranks 2 to 32 (the paper's Table 6 finds 1 to 64
#: comparable), alpha around twice the rank (peft's examples), and both target sets.
LORA_SPACE: dict[str, Param] = {
    "lora_rank": Int(2, 32, log=True, when=("adapter", "lora")),
    "lora_alpha": Float(1.0, 64.0, log=True, when=("adapter", "lora")),
    "lora_targets": Categorical(LORA_TARGETS, when=("adapter", "lora")),
}
#: peft's name of the one adapter we add (in parameter names: ``lora_A.default.weight``).
ADAPTER_NAME = "default"


@dataclass(frozen=True)
class AdaptedNames:
    """The names of a Backbone's parameters that LoRA training updates: the adapters'
    (``features....lora_A.default.weight``, ``lora_B``) and the head's. Call it on a
    parameter name, as an ``adapt_only`` predicate (:mod:`autometa.gradient`)."""

    names: frozenset[str]

    def __call__(self, name: str) -> bool:
        return name in self.names


def check_adapter(owner: str, adapter: str, rank: int, alpha: float, targets: str) -> None:
    """Check the adapter settings of algorithm ``owner`` (``"maml"``) before any is used.

    Raises:
        ConfigError: an unknown adapter or target set, a rank that is not a positive
            integer, or an alpha that is not positive.
    """
    if adapter not in ADAPTERS:
        raise ConfigError(f"{owner}.adapter: {adapter!r} is not one of "
                          f"{', '.join(map(repr, ADAPTERS))}")
    if adapter == "none":
        return
    if targets not in LORA_TARGETS:
        raise ConfigError(f"{owner}.lora_targets: {targets!r} is not one of "
                          f"{', '.join(map(repr, LORA_TARGETS))}")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ConfigError(f"{owner}.lora_rank: expected a positive integer, got {rank!r}")
    if not alpha > 0:
        raise ConfigError(f"{owner}.lora_alpha: expected a positive number, got {alpha!r}")


def lora_target_modules(features: nn.Module, targets: str) -> list[str]:
    """Names (within ``features``) of the modules that ``targets`` selects, in module order.

    Raises:
        ConfigError: an unknown target set.
    """
    if targets == "attention":
        return [name for name, module in features.named_modules()
                if name.rpartition(".")[2] in ATTENTION_NAMES
                and isinstance(module, nn.Linear | nn.Conv2d)]
    if targets == "linear":
        return [name for name, module in features.named_modules()
                if isinstance(module, nn.Linear | nn.Conv2d)]
    raise ConfigError(f"lora_targets: {targets!r} is not one of "
                      f"{', '.join(map(repr, LORA_TARGETS))}")


def lora_incompatibility(owner: str, model: Backbone, settings: Mapping[str, Any]
                         ) -> str | None:
    """Why LoRA with ``settings`` (an algorithm's: ``adapter``, ``lora_targets``, each a
    fixed value or a searched :class:`~autometa.space.Categorical`) cannot adapt
    ``model``: no choice of ``lora_targets`` selects a layer of its features. None if it
    can, or if the adapter is not (or not only) LoRA. For
    :meth:`autometa.algorithm.MetaAlgorithm.model_incompatibility`.
    """
    if settings.get("adapter", "none") != "lora":
        return None
    targets = settings.get("lora_targets", "attention")
    choices = targets.choices if isinstance(targets, Categorical) else (targets,)
    if any(lora_target_modules(model.features, str(t)) for t in choices):
        return None
    return (f"{owner}.lora_targets {' or '.join(map(repr, choices))} matches no layer of the "
            f"source model's {type(model.features).__name__}; set {owner}.lora_targets=linear "
            "(every Linear and Conv2d layer)")


def add_lora(model: Backbone, *, rank: int = 8, alpha: float = 16.0,
             targets: str = "attention", owner: str = "adapter") -> AdaptedNames:
    """Add LoRA adapters to ``model.features`` in place and freeze its other parameters.

    The adapters are created on the device and in the dtype of the layer they adapt. The
    head is left trainable; buffers are untouched.

    Args:
        model: the Backbone; its ``features`` get the adapters.
        rank: r, the rank of ``B A``.
        alpha: LoRA's scale numerator: the update is ``(alpha / rank) * B A x``.
        targets: ``"attention"`` or ``"linear"`` (module docstring).
        owner: the algorithm's name in messages (``"maml"``).

    Returns:
        The predicate of the trained parameters' names (the adapters' and the head's).

    Raises:
        ConfigError: peft is not installed; ``targets`` selects no module; the features
            already carry LoRA adapters (build the algorithm on a fresh model).
    """
    try:
        from peft import LoraConfig, inject_adapter_in_model
        from peft.tuners.lora import LoraLayer
    except ImportError:
        raise ConfigError("adapter 'lora' needs peft: pip install 'autometa-ml[hf]'") from None
    features = model.features
    if any(isinstance(m, LoraLayer) for m in features.modules()):
        raise ConfigError(f"{owner}.adapter 'lora': the model's features already carry LoRA "
                          "adapters; build the algorithm on a freshly built model")
    modules = lora_target_modules(features, targets)
    if not modules:
        fix = (f"set {owner}.lora_targets=linear (every Linear and Conv2d layer)"
               if targets == "attention" else f"set {owner}.adapter=none")
        raise ConfigError(f"{owner}.lora_targets={targets!r} matches no layer of "
                          f"{type(features).__name__}; {fix}")
    # peft annotates lora_alpha as int, but only uses it as the ratio lora_alpha / r.
    config = LoraConfig(r=rank, lora_alpha=alpha,  # type: ignore[arg-type]
                        lora_dropout=0.0, bias="none", target_modules=modules,
                        init_lora_weights=True)
    # With a list of names peft matches a module whose name equals one (or ends in
    # "." + one): our full names select exactly the modules found above.
    inject_adapter_in_model(config, features, adapter_name=ADAPTER_NAME)
    for name, p in features.named_parameters():
        p.requires_grad_(".lora_A." in name or ".lora_B." in name)
    for p in model.head.parameters():
        p.requires_grad_(True)
    return AdaptedNames(frozenset(name for name, p in model.named_parameters()
                                  if p.requires_grad))
