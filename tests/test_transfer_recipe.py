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
import os
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


def _glyph_folders(root: Path, classes: int, per_class: int) -> None:
    """``classes`` folders of ``per_class`` 16x16 RGB images: each class a bright bar at
    its own angle on noise, so that a few-shot learner has something to find."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(classes):
        folder = root / f"class-{c:02d}"
        folder.mkdir(parents=True)
        angle = np.pi * c / classes
        for i in range(per_class):
            pixels = rng.integers(0, 60, size=(16, 16, 3)).astype(np.uint8)
            for t in np.linspace(-6, 6, 25):
                r = int(round(8 + t * np.sin(angle) + rng.normal(0, 0.5)))
                q = int(round(8 + t * np.cos(angle) + rng.normal(0, 0.5)))
                if 0 <= r < 16 and 0 <= q < 16:
                    pixels[r, q] = (230, 200, 90 + 15 * (c % 10))
            Image.fromarray(pixels).save(folder / f"{i:02d}.png")


@pytest.mark.slow
def test_bring_your_own_backbone_recipe(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's "Bring your own backbone" recipe on a directory saved here: a small
    random ViT written by examples/save_backbone.py, searched with fine-tuning, ProtoNet,
    MAML with LoRA adapters and P>M>F, ranked with the baselines, reported."""
    import subprocess

    from limits import QUICK_SUBPROCESS

    monkeypatch.chdir(tmp_path)
    script = Path(__file__).resolve().parents[1] / "examples" / "save_backbone.py"
    saved = subprocess.run([sys.executable, str(script), "--tiny", "vit", "tiny-vit"],
                           capture_output=True, text=True, timeout=QUICK_SUBPROCESS)
    assert saved.returncode == 0 and "wrote tiny-vit" in saved.stdout, saved.stderr
    _glyph_folders(tmp_path / "photos", classes=15, per_class=8)

    code = main(["run", "--task", "image-folder", "--task-param", "path=photos",
                 "--task-param", "channels=3", "--task-param", "size=16",
                 "--task-param", "ways=3", "--task-param", "val_episodes=10",
                 "--task-param", "test_episodes=20",
                 "--sources", "transformers", "--param", "transformers.path=tiny-vit",
                 "--algorithms", "finetune,protonet,maml,pmf", "--param", "maml.adapter=lora",
                 "--param", "maml.meta_batch_size=4", "--param", "pmf.finetune_steps=20",
                 "--param", "finetune.finetune_steps=10",
                 "--trials", "4", "--meta-steps", "4", "--eval-every", "4", "--pruner", "none",
                 "--study", "dino", "--threads", "1", "--no-progress"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    board = pd.read_csv(tmp_path / "autometa-reports" / "dino.csv")
    searched = board[~board["baseline"]]
    assert set(searched["source"]) == {"transformers"}
    assert {"finetune", "protonet", "maml", "pmf"} <= set(searched["algorithm"])
    lora = searched[searched["algorithm"] == "maml"]
    assert lora["params"].str.contains("adapter=lora").all()
    assert lora["maml.lora_rank"].notna().all()  # searched, since the adapter is set
    frozen = board[board["baseline"] & (board["source"] == "transformers")]
    assert set(frozen["algorithm"]) == {"nearest-centroid", "linear-probe", "linear-svm"}
    # The frozen ViT's features of the evaluation images: computed once, stored.
    stores = Path(os.environ["AUTOMETA_CACHE_DIR"]) / "stores"
    assert len(list(stores.glob("features-transformers-*.f32"))) == 1

    assert main(["report", "dino"]) == 0
    page = (tmp_path / "autometa-reports" / "dino.html").read_text(encoding="utf-8")
    assert "transformers" in page and "pmf" in page and "(baseline)" in page
    # Fixed settings are listed with the searched ones: which runs used LoRA, which weights.
    assert "maml.adapter=lora" in page and "transformers.path=tiny-vit" in page
