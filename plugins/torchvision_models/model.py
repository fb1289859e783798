"""torchvision architectures as source models, with weights from a local file.

``arch`` is any classification model of ``torchvision.models`` ("resnet18", "vgg16",
"efficientnet_b0", ...). It is built without weights (never ``weights="DEFAULT"``, which
downloads); ``path`` optionally names a local weights file, read like the ``checkpoint``
source model (``weights_only``; ``trust_pickle`` must be the bool true to allow pickled
code). The last linear layer is the classifier: everything before it is the features, and
a fresh linear head serves the task's outputs (so the file's classifier, of any size, is
ignored).

With a ``path``, the constructor reads and checks the file (a regular file, loadable, a
``state_dict``, finite values) and loads it into the network, so a bad or mismatched file
fails while the engine prepares a search, before anything is stored; :meth:`build` then
copies that network instead of reading the file again.

The features module adapts few-shot images to what the network expects: 1-channel images
are repeated to 3 channels, images are resized to ``size`` x ``size`` (bilinear, inside the
module) and, with ``normalize``, standardised with the ImageNet mean and deviation that
torchvision's pretrained weights assume (inputs in [0, 1]).

BatchNorm: with ``running_stats=False`` (the default) BatchNorm layers drop their running
statistics after loading and normalise with each batch's own, like conv4 and resnet12:
per-task statistics, and meta-training under vmap works (updating running statistics in
place does not). ``running_stats=True`` keeps torchvision's behaviour.
"""

from __future__ import annotations

import copy
import importlib
import os
from types import ModuleType

import torch
from torch import Tensor, nn

from autometa import Backbone, ConfigError, PluginError, SourceModel, TaskSpec
from autometa.errors import unknown
from autometa.images import PixelInputs
from autometa.weights import check_flag, load_weights, read_state_dict
from autometa_plugins.torchvision_models import missing_reason

#: Auxiliary classifiers (GoogLeNet, Inception v3): dropped, they only serve ImageNet training.
AUXILIARY = ("aux1", "aux2", "AuxLogits")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def torchvision_models() -> ModuleType:
    """``torchvision.models``, or a PluginError saying how to install it."""
    reason = missing_reason()
    if reason:
        raise PluginError(reason)
    try:
        return importlib.import_module("torchvision.models")
    except Exception as exc:  # e.g. a torchvision built for another torch
        raise PluginError(
            f"torchvision cannot be imported ({type(exc).__name__}: {exc}); reinstall the "
            "release matching your torch"
        ) from exc


class ImageFeatures(nn.Module):
    """Channel repeat, resize and normalisation, then the network without its classifier."""

    def __init__(self, net: nn.Module, size: int, normalize: bool) -> None:
        super().__init__()
        self.net = net
        self.size = size
        self.inputs = PixelInputs((size, size), *((IMAGENET_MEAN, IMAGENET_STD) if normalize
                                                  else (None, None)))

    def forward(self, x: Tensor) -> Tensor:  # (n, 1 or 3, H, W) -> (n, d)
        return self.net(self.inputs(x)).flatten(1)


class TorchvisionModel(SourceModel):
    input_ranks = (3,)  # (channels, height, width) images

    def __init__(
        self,
        *,
        arch: str = "resnet18",  # a classification model of torchvision.models
        path: str | os.PathLike[str] | None = None,  # local weights file (None: random init)
        size: int = 224,  # inputs are resized to size x size
        normalize: bool = True,  # ImageNet mean/std standardisation of [0, 1] inputs
        running_stats: bool = False,  # keep BatchNorm running statistics (see module doc)
        trust_pickle: bool = False,  # allow a weights file holding pickled code
    ) -> None:
        self.models = torchvision_models()
        names = _architectures(self.models)
        if arch not in names:
            raise ConfigError(unknown("torchvision architecture", arch, names))
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ConfigError(f"torchvision.size: expected a positive integer, got {size!r}")
        self.arch = arch
        self.path = path
        self.pretrained_features = path is not None  # random weights are not worth freezing
        self.size = size
        self.normalize = check_flag("torchvision.normalize", normalize)
        self.running_stats = check_flag("torchvision.running_stats", running_stats)
        self.trust_pickle = check_flag("torchvision.trust_pickle", trust_pickle)
        # With a file: the network with its weights, read and checked now (in preparation).
        self._loaded: tuple[nn.Module, int] | None = None
        if path is not None:
            state = read_state_dict(path, trust_pickle=self.trust_pickle,
                                    setting="torchvision.trust_pickle")
            with torch.random.fork_rng(devices=[]):  # every weight comes from the file
                net, in_features, classifier = self._network()
            # The file's classifier (any number of classes) and auxiliary heads are not used.
            unused = (classifier + ".", *(name + "." for name in AUXILIARY))
            load_weights(net, state, file=path, arch=f"torchvision {arch}",
                         ignore=lambda key: key.startswith(unused))
            self._loaded = net, in_features

    @classmethod
    def incompatibility(cls, spec: TaskSpec) -> str | None:
        reason = missing_reason()
        if reason:
            return f"needs torchvision, which is not installed: {reason.split(': ', 1)[1]}"
        reason = super().incompatibility(spec)
        if reason is None and spec.input_shape[0] not in (1, 3):
            reason = f"needs 1- or 3-channel images, the task's have {spec.input_shape[0]}"
        return reason

    def build(self, spec: TaskSpec) -> Backbone:
        if self._loaded is not None:
            net, in_features = copy.deepcopy(self._loaded[0]), self._loaded[1]
        else:
            net, in_features, _ = self._network()
        if not self.running_stats:
            for m in net.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.track_running_stats = False
                    m.running_mean = m.running_var = m.num_batches_tracked = None
        features = ImageFeatures(net, self.size, self.normalize)
        return Backbone(features, nn.Linear(in_features, spec.output_size))

    def _network(self) -> tuple[nn.Module, int, str]:
        """The architecture without auxiliary heads and with its classifier replaced by an
        identity; the classifier's input width and dotted name."""
        builder = getattr(self.models, "get_model", None)
        net: nn.Module = (builder(self.arch, weights=None) if builder
                          else getattr(self.models, self.arch)(weights=None))
        auxiliary = [name for name in AUXILIARY if getattr(net, name, None) is not None]
        for name in auxiliary:
            setattr(net, name, None)
        if auxiliary:
            net.aux_logits = False  # their forward then returns the logits alone
        classifier = _classifier(net, self.arch)
        in_features = net.get_submodule(classifier).in_features
        _set(net, classifier, nn.Identity())
        return net, in_features, classifier


def _architectures(models: ModuleType) -> list[str]:
    lister = getattr(models, "list_models", None)
    if lister is not None:
        return list(lister(module=models))
    return [n for n in dir(models) if n[:1].islower() and callable(getattr(models, n))]


def _classifier(net: nn.Module, arch: str) -> str:
    """Dotted name of the last linear layer: the ImageNet classifier in torchvision models."""
    linear = [name for name, m in net.named_modules() if isinstance(m, nn.Linear)]
    if not linear:
        raise PluginError(
            f"torchvision architecture {arch!r} has no linear classifier to replace; "
            "choose another 'arch' (resnet, vgg, densenet, efficientnet, vit, ...)"
        )
    return linear[-1]


def _set(net: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(net.get_submodule(parent) if parent else net, child, module)
