"""The README's classic transfer recipe, end to end as a user runs it: a pretrained
backbone from a local ``.pth`` file (torchvision's VGG16 there), transferred to an
"airplane or not" image folder, its train and test accuracy in the HTML report.

torchvision cannot be installed beside this machine's torch, so a stand-in
``torchvision.models`` builds a small VGG-shaped network under the name ``vgg16`` (the
plugin's code path is the real one: build without weights, load the local file with
``weights_only``, replace the classifier, resize and normalise the inputs).
"""

from __future__ import annotations

import html
import re
import sys
import types
from pathlib import Path

import pandas as pd
import pytest
import torch
from test_airplane_scenario import _draw
from torch import nn

from autometa.cli import main


class SmallVGG(nn.Module):
    """VGG's shape (Simonyan and Zisserman 2015): conv blocks, then a classifier that is a
    Sequential ending in the 1000-way layer, which the plugin replaces."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                                      nn.MaxPool2d(2), nn.Conv2d(8, 16, 3, padding=1),
                                      nn.ReLU(), nn.AdaptiveAvgPool2d(2))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(),
                                        nn.Dropout(), nn.Linear(32, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


@pytest.fixture
def torchvision_with_vgg16(monkeypatch: pytest.MonkeyPatch) -> None:
    tv = types.ModuleType("torchvision")
    models = types.ModuleType("torchvision.models")

    def get_model(name: str, *, weights: object, **config: object) -> nn.Module:
        assert weights is None  # the plugin never asks for a download
        return {"vgg16": SmallVGG}[name](**config)  # type: ignore[arg-type]

    models.get_model = get_model  # type: ignore[attr-defined]
    models.list_models = lambda module=None: ["vgg16"]  # type: ignore[attr-defined]
    tv.models = models  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "torchvision", tv)
    monkeypatch.setitem(sys.modules, "torchvision.models", models)


@pytest.mark.usefixtures("torchvision_with_vgg16")
def test_pretrained_vgg_from_a_pth_file_transferred_to_airplanes(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    _draw(tmp_path / "photos" / "airplane", True, 20, 0)
    _draw(tmp_path / "photos" / "not-airplane", False, 20, 1)
    # The user's weights file: what `torch.save(vgg16(weights="DEFAULT").state_dict(), ...)`
    # writes on a machine with internet (here random weights of the stand-in network).
    torch.manual_seed(0)
    torch.save(SmallVGG().state_dict(), tmp_path / "vgg16.pth")

    code = main(["run", "--task", "image-folder", "--task-param", "path=photos",
                 "--task-param", "episodes=split", "--task-param", "size=16",
                 "--task-param", "channels=3",
                 "--sources", "torchvision", "--param", "torchvision.arch=vgg16",
                 "--param", "torchvision.path=vgg16.pth", "--param", "torchvision.size=32",
                 "--algorithms", "finetune", "--param", "finetune.finetune_steps=20",
                 "--trials", "2", "--meta-steps", "10", "--eval-every", "10",
                 "--study", "planes", "--threads", "1", "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0, out
    board = pd.read_csv(tmp_path / "autometa-reports" / "planes.csv")
    # The searched fine-tuning trials and the baselines on the frozen VGG features.
    assert set(board["source"]) == {"torchvision", "raw"}
    frozen = board[(board["source"] == "torchvision") & board["baseline"]]
    assert set(frozen["algorithm"]) == {"nearest-centroid", "linear-probe", "linear-svm"}
    scored = board[board["test_accuracy"].notna()]
    assert scored["train_accuracy"].between(0, 1).all()
    assert (scored["test_ci_over"] == "examples").all()

    assert main(["report", "planes", "--out", "reports"]) == 0
    page = html.unescape(re.sub(r"<[^>]+>", " ", (tmp_path / "reports" / "planes.html")
                                .read_text(encoding="utf-8")))
    assert "train accuracy" in page and "test accuracy, 95% interval" in page
    best = scored.iloc[0]
    assert f"{best['train_accuracy']:.4g}" in page
