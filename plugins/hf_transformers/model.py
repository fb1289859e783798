"""Vision transformers saved with ``save_pretrained``, as source models.

``path`` is a local directory written by ``save_pretrained`` (or a ``.safetensors`` file in
such a directory, next to its ``config.json``): ViT (Dosovitskiy et al. 2021, "An Image is
Worth 16x16 Words"), DINOv2 (Oquab et al. 2023, "DINOv2: Learning Robust Visual Features
without Supervision"), CLIP's vision tower (Radford et al. 2021, "Learning Transferable
Visual Models From Natural Language Supervision"; a full ``CLIPModel`` directory gives its
``CLIPVisionModel``), or any model ``transformers.AutoModel`` maps to one taking
``pixel_values`` alone. Hub names are refused: nothing is downloaded.

The constructor reads and checks the directory (config, image processor settings, every
weight present), so a bad one fails while the engine prepares a search, before anything
is stored; :meth:`TransformersModel.build` deep-copies the loaded network and adds a fresh
linear head of the feature width.

The features module does, as a tensor operation, what the directory's image processor
does to images in [0, 1]: 1-channel images are repeated to 3 channels, resized (bilinear)
to the processor's size (its ``crop_size`` when it center-crops: few-shot images are
resized whole, never cropped), and standardised with the processor's ``image_mean`` and
``image_std`` (its ``rescale`` by 1/255 is for uint8 images: ours are already in [0, 1]).
Without ``preprocessor_config.json``: the config's ``image_size`` and ImageNet's mean and
deviation (CLIP's own for CLIP models).

Pooling (``pooling=None`` picks the model's conventional pooled feature):
- ViT: ``"cls"``, the class token after the final layer norm, which
  ``ViTForImageClassification`` classifies (ViT's ``pooler``, a dense + tanh layer, is
  missing from many checkpoints, and would then be random: the model is loaded without it).
- DINOv2: ``"cls"``, the class token after the final layer norm (the model's
  ``pooler_output``; the paper's linear probes read it).
- CLIP: ``"pooler"``, the class token after ``post_layernorm``, which CLIP projects into
  its joint embedding space (``last_hidden_state`` is before that norm).
- anything else: ``"pooler"``, the model's own ``pooler_output``.
``"mean"`` averages the patch tokens (the class token and DINOv2's registers left out).

Attention (``attention``): ``"eager"`` by default, the implementation a second-order
meta-gradient can differentiate twice; ``"sdpa"`` (PyTorch's fused attention) is faster
for ProtoNet, fine-tuning, first-order MAML and the baselines.

Train mode: the engine switches the network between train and eval. ViT, DINOv2 and CLIP
configs default to no dropout (``hidden_dropout_prob``, ``attention_probs_dropout_prob``,
``attention_dropout``, ``drop_path_rate`` are 0.0, as in the published checkpoints), so
both modes compute the same features; a config with dropout applies it in train mode.
"""

from __future__ import annotations

import copy
import inspect
import logging
import os

import torch
from torch import Tensor, nn

from autometa import Backbone, ConfigError, SourceModel, TaskSpec
from autometa.images import PixelInputs
from autometa.weights import check_flag
from autometa_plugins.hf_transformers import loading, missing_reason

log = logging.getLogger(__name__)

POOLINGS = ("cls", "mean", "pooler")
#: (task image size, model size) pairs already warned about in this process.
_WARNED: set[tuple[tuple[int, ...], tuple[int, int]]] = set()
#: transformers' attention implementations offered: "eager" is plain autograd (twice
#: differentiable: second-order MAML, Meta-SGD and ANIL differentiate through the inner
#: gradient); "sdpa" is PyTorch's fused scaled_dot_product_attention, faster and leaner,
#: but its fused kernels have no double backward (first-order algorithms only).
ATTENTION = ("eager", "sdpa")
#: The conventional pooled feature per model type (see the module docstring).
DEFAULT_POOLING = {"vit": "cls", "dinov2": "cls", "dinov2_with_registers": "cls",
                   "clip_vision_model": "pooler"}


class VisionFeatures(nn.Module):
    """Channel repeat, resize and normalisation, then the model and its pooling."""

    def __init__(self, net: nn.Module, size: tuple[int, int], mean: tuple[float, ...] | None,
                 std: tuple[float, ...] | None, pooling: str, skip: int,
                 interpolate: bool) -> None:
        super().__init__()
        self.net = net
        self.size = size
        self.pooling = pooling
        self.skip = skip  # leading tokens that are not patches (class token, registers)
        self.interpolate = interpolate  # position embeddings resized for another size
        self.inputs = PixelInputs(size, mean, std)

    def forward(self, x: Tensor) -> Tensor:  # (n, 1 or 3, H, W) in [0, 1] -> (n, d)
        x = self.inputs(x)
        extra = {"interpolate_pos_encoding": True} if self.interpolate else {}
        out = self.net(pixel_values=x, return_dict=True, **extra)
        if self.pooling == "pooler":
            return out.pooler_output.flatten(1)  # (n, d)
        tokens = out.last_hidden_state  # (n, tokens, d)
        if self.pooling == "cls":
            return tokens[:, 0]
        return tokens[:, self.skip:].mean(1)


class TransformersModel(SourceModel):
    input_ranks = (3,)  # (channels, height, width) images
    pretrained_features = True  # the weights come from the directory

    def __init__(
        self,
        *,
        path: str | os.PathLike[str] | None = None,  # save_pretrained directory (required)
        pooling: str | None = None,  # "cls", "mean" or "pooler"; None: the model's own
        size: int | None = None,  # inputs resized to size x size; None: the processor's
        normalize: bool = True,  # the processor's mean/std standardisation of [0, 1] inputs
        attention: str = "eager",  # "eager" (second-order MAML) or "sdpa" (fused, faster)
    ) -> None:
        hf = loading.transformers()
        if pooling is not None and pooling not in POOLINGS:
            raise ConfigError(f"transformers.pooling: expected one of {list(POOLINGS)} or "
                              f"none, got {pooling!r}")
        if size is not None and (isinstance(size, bool) or not isinstance(size, int)
                                 or size < 1):
            raise ConfigError(f"transformers.size: expected a positive integer, got {size!r}")
        if attention not in ATTENTION:
            raise ConfigError(f"transformers.attention: expected one of {list(ATTENTION)}, "
                              f"got {attention!r}")
        self.attention = attention
        self.normalize = check_flag("transformers.normalize", normalize)
        self.directory, weights = loading.locate(path)
        self.path = path
        config, self.model_type = loading.vision_config(hf, self.directory)
        cls = loading.model_class(hf, config, self.directory, self.model_type)
        kind = str(getattr(config, "model_type", self.model_type))
        self.pooling = pooling or DEFAULT_POOLING.get(kind, "pooler")
        extra: dict[str, object] = {"attn_implementation": attention}
        if "add_pooling_layer" in inspect.signature(cls.__init__).parameters:
            extra["add_pooling_layer"] = self.pooling == "pooler"  # ViT: no random pooler
        self.processing = loading.processing(hf, self.directory, self.model_type)
        native = _pair(getattr(config, "image_size", None))
        chosen = (size, size) if size is not None else self.processing.size or native
        if chosen is None:
            raise ConfigError(f"transformers.path '{self.directory}': neither the config nor "
                              "preprocessor_config.json gives an image size; set "
                              "transformers.size")
        self.size = chosen
        forward = inspect.signature(cls.forward).parameters
        self.interpolate = "interpolate_pos_encoding" in forward and chosen != native
        with torch.random.fork_rng(devices=[]):  # loading leaves the trials' seeding alone
            net = loading.load(cls, config, self.directory, weights, extra)
        self.skip = 1 + int(getattr(config, "num_register_tokens", 0) or 0)
        self._features = self._wrap(net)
        self.width = _width(self._features, self.directory, self.pooling)
        log.info("transformers: %s from %s, %s pooling, %d features, size %s, mean/std from "
                 "%s", cls.__name__, self.directory, self.pooling, self.width, chosen,
                 self.processing.source)

    @classmethod
    def incompatibility(cls, spec: TaskSpec) -> str | None:
        reason = missing_reason()
        if reason:
            return f"needs transformers, which is not installed: {reason.split(': ', 1)[1]}"
        reason = super().incompatibility(spec)
        if reason is None and spec.input_shape[0] not in (1, 3):
            reason = f"needs 1- or 3-channel images, the task's have {spec.input_shape[0]}"
        return reason

    def build(self, spec: TaskSpec) -> Backbone:
        small = tuple(spec.input_shape[1:])
        if any(2 * have < want for have, want in zip(small, self.size, strict=False)) \
                and (small, self.size) not in _WARNED:
            _WARNED.add((small, self.size))
            log.warning("transformers: the task's %s images are resized up to %s for %s; "
                        "decode them nearer the model's size (image-folder and the benchmark "
                        "tasks: --task-param size=%d)", "x".join(map(str, small)),
                        "x".join(map(str, self.size)), self.directory, max(self.size))
        features = copy.deepcopy(self._features)
        return Backbone(features, nn.Linear(self.width, spec.output_size))

    def _wrap(self, net: nn.Module) -> VisionFeatures:
        mean = self.processing.mean if self.normalize else None
        std = self.processing.std if self.normalize else None
        return VisionFeatures(net, self.size, mean, std, self.pooling, self.skip,
                              self.interpolate)


def _pair(size: object) -> tuple[int, int] | None:
    if isinstance(size, int):
        return size, size
    if isinstance(size, (list, tuple)) and len(size) == 2:
        return int(size[0]), int(size[1])
    return None


def _width(features: VisionFeatures, directory: os.PathLike[str], pooling: str) -> int:
    """The feature width, from one forward pass (it also checks the pooling fits)."""
    features.eval()
    try:
        with torch.no_grad():
            out = features(torch.zeros(1, 3, *features.size))
    except (AttributeError, IndexError, RuntimeError, TypeError) as exc:
        raise ConfigError(f"transformers.pooling {pooling!r} does not fit the model in "
                          f"'{directory}' ({type(exc).__name__}); use pooling=\"pooler\"") from None
    finally:
        features.train()
    if out.dim() != 2:
        raise ConfigError(f"transformers.pooling {pooling!r} gives features of shape "
                          f"{list(out.shape)} for the model in '{directory}'; use another pooling")
    return int(out.shape[1])
