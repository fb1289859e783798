"""timm architectures (Wightman, "PyTorch Image Models", https://github.com/huggingface/
pytorch-image-models) as source models, with weights from a local file.

``arch`` is any ``timm.create_model`` name ("vit_small_patch16_224", "resnet50",
"convnext_tiny", ...). The network is built with ``pretrained=False`` (timm downloads
otherwise) and ``num_classes=0``, so that it returns its pooled features
(``num_features`` wide) and a fresh linear head serves the task's outputs. ``path``
optionally names a local ``.safetensors`` or ``.pth`` state dict, read through
:mod:`autometa.weights` (``weights_only`` unless ``trust_pickle`` is the bool true); the
file's classifier (``model.default_cfg["classifier"]``, e.g. ``head`` or ``fc``), of any
size, is ignored. The file is read and checked by the constructor, so a bad or mismatched
one fails while the engine prepares a search; :meth:`TimmModel.build` copies that network.

The features module repeats 1-channel images to 3 channels, resizes them (bilinear) to
``size`` (None: the model's ``pretrained_cfg["input_size"]``, else 224) and, with
``normalize``, standardises them with ``pretrained_cfg``'s ``mean``/``std`` (ImageNet's
when the model has none); inputs are in [0, 1].
"""

from __future__ import annotations

import copy
import importlib
import os
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import Tensor, nn

from autometa import Backbone, ConfigError, DataError, PluginError, SourceModel, TaskSpec
from autometa.images import PixelInputs
from autometa.weights import check_flag, load_weights, read_state_dict
from autometa_plugins.timm_models import missing_reason

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def timm() -> ModuleType:
    """The ``timm`` module, or a PluginError saying how to install it."""
    reason = missing_reason()
    if reason:
        raise PluginError(reason)
    try:
        return importlib.import_module("timm")
    except Exception as exc:  # e.g. torchvision missing or built for another torch
        raise PluginError(f"timm cannot be imported ({type(exc).__name__}: {exc}); "
                          "reinstall timm and the torchvision release matching your torch"
                          ) from exc


class ImageFeatures(nn.Module):
    """Channel repeat, resize and normalisation, then the network's pooled features."""

    def __init__(self, net: nn.Module, size: int, mean: tuple[float, ...] | None,
                 std: tuple[float, ...] | None) -> None:
        super().__init__()
        self.net = net
        self.size = size
        self.inputs = PixelInputs((size, size), mean, std)

    def forward(self, x: Tensor) -> Tensor:  # (n, 1 or 3, H, W) -> (n, num_features)
        return self.net(self.inputs(x)).flatten(1)


class TimmModel(SourceModel):
    input_ranks = (3,)  # (channels, height, width) images

    def __init__(
        self,
        *,
        arch: str = "resnet18",  # a timm.create_model name
        path: str | os.PathLike[str] | None = None,  # local .safetensors/.pth (None: random)
        size: int | None = None,  # inputs resized to size x size; None: the model's own
        normalize: bool = True,  # pretrained_cfg mean/std standardisation of [0, 1] inputs
        trust_pickle: bool = False,  # allow a .pth file holding pickled code
    ) -> None:
        module = timm()
        if size is not None and (isinstance(size, bool) or not isinstance(size, int)
                                 or size < 1):
            raise ConfigError(f"timm.size: expected a positive integer, got {size!r}")
        self.arch = arch
        self.path = path
        self.pretrained_features = path is not None  # random weights are not worth freezing
        self.normalize = check_flag("timm.normalize", normalize)
        self.trust_pickle = check_flag("timm.trust_pickle", trust_pickle)
        with torch.random.fork_rng(devices=[]):  # the trials' seeding stays untouched
            try:
                net = module.create_model(arch, pretrained=False, num_classes=0)
            except RuntimeError as exc:  # timm's "Unknown model (...)"
                raise ConfigError(f"timm.arch {arch!r}: {exc}; see timm.list_models()") from None
        cfg: dict[str, Any] = dict(getattr(net, "pretrained_cfg", None) or {})
        input_size = cfg.get("input_size")  # (3, H, W)
        self.size = size or (int(input_size[-1]) if input_size else 224)
        self.mean = tuple(cfg.get("mean") or IMAGENET_MEAN)
        self.std = tuple(cfg.get("std") or IMAGENET_STD)
        self.width = int(net.num_features)
        if path is not None:
            state = _read(Path(path).expanduser(), self.trust_pickle)
            classifier = str(cfg.get("classifier") or "head")
            load_weights(net, state, file=path, arch=f"timm {arch}",
                         ignore=lambda key: key.startswith(classifier + "."))
        self._net = net

    @classmethod
    def incompatibility(cls, spec: TaskSpec) -> str | None:
        reason = missing_reason()
        if reason:
            return f"needs timm, which is not installed: {reason.split(': ', 1)[1]}"
        reason = super().incompatibility(spec)
        if reason is None and spec.input_shape[0] not in (1, 3):
            reason = f"needs 1- or 3-channel images, the task's have {spec.input_shape[0]}"
        return reason

    def build(self, spec: TaskSpec) -> Backbone:
        mean = self.mean if self.normalize else None
        std = self.std if self.normalize else None
        features = ImageFeatures(copy.deepcopy(self._net), self.size, mean, std)
        return Backbone(features, nn.Linear(self.width, spec.output_size))


def _read(file: Path, trust_pickle: bool) -> dict[str, Tensor]:
    """A ``.safetensors`` file (never pickled) or a torch file, through autometa.weights."""
    if file.suffix != ".safetensors":
        return read_state_dict(file, trust_pickle=trust_pickle, setting="timm.trust_pickle")
    if not file.is_file():
        raise ConfigError(f"weights file '{file}' does not exist; set timm.path to a local "
                          "file (nothing is downloaded)")
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise PluginError("reading .safetensors needs safetensors: pip install safetensors"
                          ) from None
    try:
        state = load_file(file)
    except Exception as exc:
        raise DataError(f"weights file '{file}' is not a readable .safetensors file "
                        f"({type(exc).__name__}); save it again") from None
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise DataError(f"weights file '{file}' holds NaN or infinite values (tensor "
                        f"{bad[0]!r}); the file is damaged or from a diverged run; use another")
    return state
