"""timm source model: listed but unavailable without timm; pooled features, pretrained_cfg
normalisation and local weights checked against a stand-in ``timm`` package (a real
package on sys.path whose create_model builds a small torch network, as timm's does)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from limits import QUICK_SUBPROCESS
from safetensors.torch import save_file

import autometa
from autometa import ConfigError, DataError, PluginError, TaskSpec
from autometa_plugins import timm_models

SPEC = TaskSpec("classification", (1, 8, 8), 5)

STAND_IN = '''
"""A stand-in for timm: create_model(name, pretrained, num_classes) like timm's."""
import torch
from torch import nn


class TinyNet(nn.Module):
    """Like timm's models: num_features, pretrained_cfg, a classifier named ``head``
    that num_classes=0 makes an identity (the forward then returns pooled features)."""

    def __init__(self, num_classes=1000):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.num_features = 6
        self.head = nn.Linear(6, num_classes) if num_classes else nn.Identity()
        self.pretrained_cfg = {"input_size": (3, 12, 12), "mean": (0.1, 0.2, 0.3),
                               "std": (0.5, 0.6, 0.7), "classifier": "head"}
        self.seen = []

    def forward(self, x):
        self.seen.append(tuple(x.shape))
        return self.head(torch.relu(self.conv(x)).mean((2, 3)))


def create_model(name, pretrained=False, num_classes=1000):
    assert pretrained is False  # never a download
    if name != "tinynet":
        raise RuntimeError(f"Unknown model ({name})")
    return TinyNet(num_classes=num_classes)
'''


@pytest.fixture
def fake_timm(tmp_path, monkeypatch):
    (tmp_path / "timm").mkdir()
    (tmp_path / "timm" / "__init__.py").write_text(textwrap.dedent(STAND_IN))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "timm", raising=False)
    yield __import__("timm")
    sys.modules.pop("timm", None)


def source(**settings):
    """The source model as the engine gets it: through the installed entry point."""
    return autometa.create_host().get("source", "timm").load()(**settings)


def test_pooled_features_and_a_fresh_head(fake_timm):
    model = source(arch="tinynet").build(SPEC)
    assert (model.head.in_features, model.head.out_features) == (6, 5)
    x = torch.rand(3, 1, 8, 8)
    assert model(x).shape == (3, 5)
    assert model.features.net.seen[-1] == (3, 3, 12, 12)  # pretrained_cfg's input size
    # Features equal the network's own on the standardised, resized 3-channel images.
    mean = torch.tensor([0.1, 0.2, 0.3]).view(1, 3, 1, 1)
    std = torch.tensor([0.5, 0.6, 0.7]).view(1, 3, 1, 1)
    resized = torch.nn.functional.interpolate(x.expand(-1, 3, -1, -1), size=(12, 12),
                                              mode="bilinear", align_corners=False)
    torch.testing.assert_close(model.features(x), model.features.net((resized - mean) / std))
    assert source(arch="tinynet", size=16).build(SPEC).features.size == 16


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_weights_from_a_local_file_the_classifier_ignored(fake_timm, tmp_path, suffix):
    torch.manual_seed(3)
    saved = fake_timm.create_model("tinynet", num_classes=10)  # any classifier size
    path = tmp_path / f"w{suffix}"
    if suffix == ".safetensors":
        save_file(saved.state_dict(), path)
    else:
        torch.save(saved.state_dict(), path)
    model = source(arch="tinynet", path=str(path)).build(SPEC)
    assert torch.equal(model.features.net.conv.weight, saved.conv.weight)
    assert model.head.out_features == 5


def test_bad_files_and_names(fake_timm, tmp_path):
    with pytest.raises(ConfigError, match=r"timm.arch 'resnet9000': Unknown model"):
        source(arch="resnet9000")
    with pytest.raises(ConfigError, match=r"'.*missing\.safetensors' does not exist"):
        source(arch="tinynet", path=str(tmp_path / "missing.safetensors"))
    state = fake_timm.create_model("tinynet").state_dict()
    state["conv.bias"][0] = float("nan")
    save_file(state, tmp_path / "nan.safetensors")
    with pytest.raises(DataError, match=r"holds NaN or infinite values \(tensor 'conv\.bias'\)"):
        source(arch="tinynet", path=str(tmp_path / "nan.safetensors"))
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ConfigError, match=r"does not fit architecture 'timm tinynet'"):
        source(arch="tinynet", path=str(tmp_path / "other.pth"))


def test_unavailable_without_timm(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)
    host = autometa.create_host(entry_points=False, plugins={"timm": timm_models})
    reg = host.get("source", "timm")
    assert "unavailable: timm is not installed (pip install timm)" in reg.description
    cls = reg.load()
    assert cls.incompatibility(SPEC).startswith("needs timm, which is not installed: pip "
                                                "install timm")
    with pytest.raises(PluginError, match=r"^timm is not installed: pip install timm"):
        cls(arch="tinynet")


def test_registration_imports_neither_torch_nor_timm():
    code = (
        "import sys; sys.modules['timm'] = None\n"
        "import autometa\n"
        "from autometa_plugins import timm_models as tm\n"
        "host = autometa.create_host(entry_points=False, plugins={'timm': tm})\n"
        "print('torch' in sys.modules, host.get('source', 'timm').description)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=QUICK_SUBPROCESS).stdout
    assert out.startswith("False ") and "unavailable: timm is not installed" in out
