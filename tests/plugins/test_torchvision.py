"""torchvision source model: listed but unavailable without torchvision; head replacement,
input adaptation and local weights checked against a stand-in ``torchvision`` module."""

from __future__ import annotations

import os
import subprocess
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from limits import QUICK_SUBPROCESS
from torch import nn

import autometa
from autometa import ConfigError, DataError, PluginError, SearchConfig, TaskSpec
from autometa.engine.prepare import prepare
from autometa_plugins import conv4, digits, maml, torchvision_models
from autometa_plugins.torchvision_models.model import ImageFeatures, TorchvisionModel

SPEC = TaskSpec("classification", (1, 8, 8), 5)


# -- without torchvision (the normal case here; forced so the tests hold everywhere) ------
@pytest.fixture
def no_torchvision(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # import and find_spec: not found


def test_listed_as_unavailable_with_the_reason(no_torchvision):
    host = autometa.create_host(entry_points=False,
                                plugins={"torchvision": torchvision_models})
    reg = host.get("source", "torchvision")
    assert "unavailable: torchvision is not installed (pip install torchvision)" in \
        reg.description
    assert reg.load() is TorchvisionModel  # the class itself imports without torchvision
    assert TorchvisionModel.incompatibility(SPEC) == (
        "needs torchvision, which is not installed: pip install torchvision (the release "
        "matching your torch)")


def test_using_it_raises_a_clear_plugin_error(no_torchvision):
    with pytest.raises(PluginError, match=r"^torchvision is not installed: pip install "
                                          r"torchvision"):
        TorchvisionModel()


def test_search_leaves_it_out_or_refuses_it_by_name(no_torchvision, tmp_path):
    host = autometa.create_host(entry_points=False, plugins={
        "digits": digits, "maml": maml, "conv4": conv4, "torchvision": torchvision_models})
    small = {"val_episodes": 2, "test_episodes": 2}
    prepared = prepare(SearchConfig(task="digits", task_params=small), host)
    assert list(prepared.sources) == ["conv4"]
    named = SearchConfig(task="digits", task_params=small, sources=["torchvision"])
    with pytest.raises(ConfigError, match=r"source model 'torchvision' cannot be used here: "
                                          r"torchvision is not installed"):
        prepare(named, host)
    assert not (tmp_path / "autometa.db").exists()


def test_registration_imports_neither_torch_nor_torchvision():
    code = (
        "import sys; sys.modules['torchvision'] = None\n"
        "import autometa\n"
        "from autometa_plugins import torchvision_models as tv\n"
        "host = autometa.create_host(entry_points=False, plugins={'torchvision': tv})\n"
        "print('torch' in sys.modules, host.get('source', 'torchvision').description)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=QUICK_SUBPROCESS).stdout
    assert out.startswith("False ")
    assert "unavailable: torchvision is not installed" in out


# -- a stand-in torchvision: the logic that does not depend on real architectures ----------
class TinyResNet(nn.Module):
    """Like torchvision's ResNet: BatchNorm with running statistics, classifier ``fc``."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, num_classes)
        self.seen: list[tuple[int, ...]] = []

    def forward(self, x):
        self.seen.append(tuple(x.shape))
        x = F.adaptive_avg_pool2d(F.relu(self.bn(self.conv(x))), 1).flatten(1)
        return self.fc(x)


class TinyVGG(nn.Module):
    """Like torchvision's VGG: the classifier is a Sequential ending in the 1000-way layer."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.features = nn.Conv2d(3, 4, 3, padding=1)
        self.classifier = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Dropout(),
                                        nn.Linear(6, num_classes))

    def forward(self, x):
        return self.classifier(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


class TinyGoogLeNet(TinyResNet):
    """Like GoogLeNet: an auxiliary classifier and a tuple output while training."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__(num_classes)
        self.aux_logits = True
        self.aux1 = nn.Linear(4, num_classes)

    def forward(self, x):
        out = super().forward(x)
        return (out, out) if self.training and self.aux_logits else out


class TinySqueezeNet(nn.Module):
    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.classifier = nn.Conv2d(3, num_classes, 1)


ARCHS = {"tinyresnet": TinyResNet, "tinyvgg": TinyVGG, "tinygooglenet": TinyGoogLeNet,
         "tinysqueezenet": TinySqueezeNet}


@pytest.fixture
def fake_torchvision(monkeypatch):
    tv = types.ModuleType("torchvision")
    models = types.ModuleType("torchvision.models")

    def get_model(name, *, weights, **config):
        assert weights is None  # never a download
        return ARCHS[name](**config)

    models.get_model = get_model
    models.list_models = lambda module=None: sorted(ARCHS)
    tv.models = models
    monkeypatch.setitem(sys.modules, "torchvision", tv)
    monkeypatch.setitem(sys.modules, "torchvision.models", models)


def test_head_is_replaced_for_the_tasks_classes(fake_torchvision):
    model = TorchvisionModel(arch="tinyresnet", size=16).build(SPEC)
    assert isinstance(model.features, ImageFeatures)
    assert isinstance(model.features.net.fc, nn.Identity)
    assert (model.head.in_features, model.head.out_features) == (4, 5)
    x = torch.rand(3, 1, 8, 8)
    assert model.features(x).shape == (3, 4)
    assert model(x).shape == (3, 5)
    # 1-channel inputs repeated to 3 channels and resized inside the features module.
    assert model.features.net.seen[-1] == (3, 3, 16, 16)


def test_features_keep_everything_before_the_last_linear_layer(fake_torchvision):
    model = TorchvisionModel(arch="tinyvgg", size=8).build(SPEC)
    classifier = model.features.net.classifier
    assert isinstance(classifier[0], nn.Linear) and isinstance(classifier[3], nn.Identity)
    assert model.head.in_features == 6
    assert model(torch.rand(2, 3, 8, 8)).shape == (2, 5)


def test_normalisation_uses_imagenet_statistics(fake_torchvision):
    plain = TorchvisionModel(arch="tinyresnet", size=8, normalize=False).build(SPEC).features
    normed = TorchvisionModel(arch="tinyresnet", size=8).build(SPEC).features
    normed.net.load_state_dict(plain.net.state_dict())
    x = torch.rand(2, 3, 8, 8)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    assert torch.allclose(normed(x), plain((x - mean) / std), atol=1e-6)
    assert not any(k in normed.state_dict() for k in ("mean", "std"))  # constants, not state


def test_weights_from_a_local_file_any_classifier_size(fake_torchvision, tmp_path):
    for classes in (1000, 10):
        torch.manual_seed(classes)
        saved = TinyResNet(num_classes=classes)
        path = tmp_path / f"tiny{classes}.pt"
        torch.save(saved.state_dict(), path)
        model = TorchvisionModel(arch="tinyresnet", path=str(path), size=8,
                                 running_stats=True).build(SPEC)
        net = model.features.net
        assert torch.equal(net.conv.weight, saved.conv.weight)
        assert torch.equal(net.bn.running_var, saved.bn.running_var)
        assert model.head.out_features == 5


def test_mismatched_weights_file(fake_torchvision, tmp_path):
    path = tmp_path / "vgg.pt"
    torch.save(TinyVGG().state_dict(), path)
    with pytest.raises(ConfigError, match=r"does not fit architecture 'torchvision tinyresnet': "
                                          r".*missing conv\.weight"):
        TorchvisionModel(arch="tinyresnet", path=str(path)).build(SPEC)


def test_batchnorm_drops_running_statistics_by_default(fake_torchvision):
    model = TorchvisionModel(arch="tinyresnet", size=8).build(SPEC)
    assert not model.features.net.bn.track_running_stats
    assert not any("running" in key for key in model.state_dict())
    kept = TorchvisionModel(arch="tinyresnet", size=8, running_stats=True).build(SPEC)
    assert kept.features.net.bn.track_running_stats


def test_auxiliary_classifiers_are_dropped(fake_torchvision, tmp_path):
    path = tmp_path / "g.pt"
    torch.save(TinyGoogLeNet().state_dict(), path)  # holds aux1.* tensors
    model = TorchvisionModel(arch="tinygooglenet", path=str(path), size=8).build(SPEC)
    assert model.features.net.aux1 is None
    assert model(torch.rand(2, 3, 8, 8)).shape == (2, 5)  # a tensor in training mode


def test_architecture_errors(fake_torchvision):
    with pytest.raises(ConfigError, match=r"unknown torchvision architecture 'tinyresnt' "
                                          r"\(did you mean 'tinyresnet'\?\); available:"):
        TorchvisionModel(arch="tinyresnt")
    with pytest.raises(PluginError, match="'tinysqueezenet' has no linear classifier"):
        TorchvisionModel(arch="tinysqueezenet").build(SPEC)
    with pytest.raises(ConfigError, match="torchvision.size: expected a positive integer"):
        TorchvisionModel(arch="tinyresnet", size=0)


def test_incompatibility_with_torchvision_present(fake_torchvision):
    assert TorchvisionModel.incompatibility(SPEC) is None
    assert TorchvisionModel.incompatibility(TaskSpec("classification", (2, 8, 8), 5)) == (
        "needs 1- or 3-channel images, the task's have 2")
    assert "accepts inputs of rank [3]" in TorchvisionModel.incompatibility(
        TaskSpec("regression", (4,), 1))


class Malicious:
    def __init__(self, marker) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_weights_file_is_checked_at_construction(fake_torchvision, tmp_path):
    mismatched = tmp_path / "vgg.pt"
    torch.save(TinyVGG().state_dict(), mismatched)
    with pytest.raises(ConfigError, match="does not fit architecture 'torchvision tinyresnet'"):
        TorchvisionModel(arch="tinyresnet", path=str(mismatched))  # no build() needed
    state = TinyResNet().state_dict()
    state["conv.bias"][0] = float("nan")
    diverged = tmp_path / "nan.pt"
    torch.save(state, diverged)
    with pytest.raises(DataError, match=r"holds NaN or infinite values: tensor 'conv\.bias' "
                                        r"has 1 of 4;"):
        TorchvisionModel(arch="tinyresnet", path=str(diverged))
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"model": Malicious(marker)}, evil)
    with pytest.raises(DataError, match=r"--param torchvision\.trust_pickle=true"):
        TorchvisionModel(arch="tinyresnet", path=str(evil))
    with pytest.raises(ConfigError, match=r"^torchvision\.trust_pickle: expected true or false, "
                                          r"got 'False'$"):
        TorchvisionModel(arch="tinyresnet", path=str(evil), trust_pickle="False")
    assert not marker.exists()


def test_the_file_is_read_once_and_each_build_is_a_fresh_copy(fake_torchvision, tmp_path):
    saved = TinyResNet()
    path = tmp_path / "tiny.pt"
    torch.save(saved.state_dict(), path)
    source = TorchvisionModel(arch="tinyresnet", path=str(path), size=8)
    path.unlink()  # build() must not read it again
    torch.manual_seed(1)
    first = source.build(SPEC)
    torch.manual_seed(2)
    second = source.build(SPEC)
    for model in (first, second):
        assert torch.equal(model.features.net.conv.weight, saved.conv.weight)
    assert first.features.net.conv.weight is not second.features.net.conv.weight
    assert not torch.equal(first.head.weight, second.head.weight)  # seeded per trial
