"""`autometa export`'s model.pt2: the adapted model as a torch.export program that plain
PyTorch runs, in a process that never imports autometa, with the leaderboard's test score.

The image-folder dataset is built in its published layout (``path/<class>/<image>``, and
``test_path`` a folder of test images in the same layout), so that a script with only torch
and Pillow knows the test split without autometa.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from autometa import ConfigError
from autometa.cli import main
from autometa.export_program import trace

#: Refuses every autometa import, so that the script below proves it needs none.
BLOCK = '''
import sys
class _NoAutometa:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("autometa", "autometa_plugins"):
            raise ImportError("blocked in this test: " + name)
        return None
sys.meta_path.insert(0, _NoAutometa())
'''

#: What the README shows: the test split decoded with Pillow, scored by model.pt2. One
#: batch of every test image in the task's order (class folders, then files, sorted), as
#: meta-test scores them.
PLAIN = '''
import json, pathlib, sys
import torch
from PIL import Image

results = []
test = pathlib.Path(sys.argv[1])
for folder in map(pathlib.Path, sys.argv[2:]):
    spec = json.loads((folder / "model.json").read_text())
    size, mode, channels = spec["input"]["size"], spec["input"]["pillow_mode"], \\
        spec["input"]["shape"][3]
    program = torch.export.load(str(folder / "model.pt2")).module()

    def pixels(file):  # as the task decodes its images: stretch to size x size, bilinear
        im = Image.open(file)
        im.draft(mode, (size, size))
        im = im.convert(mode).resize((size, size), Image.Resampling.BILINEAR)
        return torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(
            size, size, channels)

    files, labels = [], []
    for label, name in enumerate(spec["class_names"]):
        found = sorted(f for f in (test / name).iterdir() if not f.name.startswith("."))
        files += found
        labels += [label] * len(found)
    with torch.no_grad():
        scores = program(torch.stack([pixels(f) for f in files]))  # (N, classes)
    correct = int((scores.argmax(1) == torch.tensor(labels)).sum())
    results.append({"folder": folder.name, "correct": correct, "n": len(files)})
    one = program(torch.stack([pixels(files[0])]))  # any batch size
    assert one.shape == (1, len(spec["class_names"])), one.shape
assert not any(m.split(".")[0] in ("autometa", "autometa_plugins") for m in sys.modules)
print(json.dumps(results))
'''


def _draw(folder: Path, airplane: bool, n: int, seed: int) -> None:
    """``n`` colour images of differing sizes (some not square: stretched), a few gray
    (mode L, converted to RGB) and one JPEG (decoded with ``draft``)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        h, w = (16, 16) if i % 3 == 0 else (20, 12) if i % 3 == 1 else (40, 36)
        pixels = rng.integers(0, 60, size=(h, w, 3)).astype(np.uint8)
        if airplane:  # a bright cross: fuselage and wings
            r, c = rng.integers(5, min(h, w) - 5, size=2)
            pixels[r - 4:r + 4, c] = (230, 230, 250)
            pixels[r - 1, c - 4:c + 5] = (230, 230, 250)
        else:  # dim coloured blobs
            for _ in range(3):
                r, c = rng.integers(0, min(h, w) - 3, size=2)
                pixels[r:r + 3, c:c + 3] = rng.integers(60, 140, size=3)
        image = Image.fromarray(pixels)
        if i % 5 == 4:
            image.convert("L").save(folder / f"{i:02d}.png")
        elif i == 2:
            image.save(folder / f"{i:02d}.jpg", quality=90)
        else:
            image.save(folder / f"{i:02d}.png")


def _plain(test: Path, folders: list[Path]) -> dict[str, dict[str, int]]:
    """The script's counts per exported folder, run by a Python that cannot import
    autometa (isolated mode, and every autometa import refused)."""
    done = subprocess.run([sys.executable, "-I", "-c", BLOCK + PLAIN, str(test),
                           *map(str, folders)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return {r["folder"]: r for r in json.loads(done.stdout.strip().splitlines()[-1])}


def test_target_task_program_reproduces_the_leaderboard_without_autometa(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for name, airplane, seed in (("airplane", True, 0), ("not-airplane", False, 1)):
        _draw(tmp_path / "photos" / name, airplane, 14, seed)
        _draw(tmp_path / "test" / name, airplane, 10, seed + 10)
    # finetune (the fitted head), protonet (prototypes) and the baselines (nearest
    # centroid, linear probe, linear SVM on the raw pixels and the MLP's features).
    code = main(["run", "--task", "image-folder", "--task-param", "path=photos",
                 "--task-param", "test_path=test", "--task-param", "episodes=split",
                 "--task-param", "size=16", "--task-param", "shots=2",
                 "--task-param", "queries=2", "--algorithms", "finetune,protonet,maml,reptile",
                 "--sources", "mlp", "--param", "finetune.finetune_lr=0.5",
                 "--param", "finetune.optimizer=sgd", "--trials", "4", "--meta-steps", "6",
                 "--eval-every", "6", "--top-k", "20", "--study", "planes",
                 "--threads", "1", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    capsys.readouterr()
    board = pd.read_csv(tmp_path / "autometa-reports" / "planes.csv")
    board = board[board["test_accuracy"].notna()]
    assert {"finetune", "protonet", "maml", "reptile", "nearest-centroid", "linear-probe",
            "linear-svm"} <= set(board["algorithm"])
    folders = []
    for row in board.itertuples():
        out = tmp_path / f"rank{row.rank}"
        assert main(["export", "planes", "--rank", str(row.rank), "--out", str(out)]) == 0
        said = capsys.readouterr().out
        assert f"{out}/model.pt2, {out}/model.json" in said, said
        assert {"model.pt", "plan.json", "model.pt2", "model.json"} <= \
            {p.name for p in out.iterdir()}
        assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary file
        folders.append(out)
    spec = json.loads((folders[0] / "model.json").read_text())
    assert spec["input"]["shape"] == ["N", 16, 16, 3] and spec["input"]["dtype"] == "uint8"
    assert spec["input"]["pillow_mode"] == "RGB" and spec["input"]["resize"] == "stretch"
    assert spec["class_names"] == ["airplane", "not-airplane"]
    assert "train split (22 examples)" in spec["adapted_on"]
    assert spec["batch_statistics"] is False  # mlp and raw: no BatchNorm

    counts = _plain(tmp_path / "test", folders)
    for row in board.itertuples():
        got = counts[f"rank{row.rank}"]
        # To the last example: the same number correct out of the same test split.
        assert got["n"] == row.test_n == 20, (row.algorithm, got)
        assert got["correct"] == round(row.test_accuracy * row.test_n), \
            (row.algorithm, row.source, got, row.test_accuracy)
        assert got["correct"] / got["n"] == pytest.approx(row.test_accuracy, abs=1e-12)
    _check_onnx(tmp_path / "test", folders, spec["class_names"])


def _check_onnx(test: Path, folders: list[Path], classes: list[str]) -> None:
    """Where onnx is installed, model.onnx gives model.pt2's scores (onnxruntime)."""
    if importlib.util.find_spec("onnx") is None or \
            importlib.util.find_spec("onnxruntime") is None:
        return
    import onnxruntime

    from autometa.images import decode_files

    files = [f for name in classes for f in sorted((test / name).iterdir())]
    pixels = decode_files(files, size=16, channels=3).transpose(0, 2, 3, 1)  # (N, H, W, C)
    written = [f for f in folders if (f / "model.onnx").exists()]
    assert len(written) >= 3  # nearest-centroid's cdist has no ONNX export: said, skipped
    for folder in written:
        program = torch.export.load(str(folder / "model.pt2")).module()
        expected = program(torch.from_numpy(np.ascontiguousarray(pixels))).numpy()
        session = onnxruntime.InferenceSession(str(folder / "model.onnx"),
                                               providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        got = session.run(None, {name: np.ascontiguousarray(pixels)})[0]
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_a_pretrained_checkpoints_input_stage_is_inside_the_program(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The issue's case: fine-tuning on a checkpoint (a save_pretrained ViT whose image
    processor resizes 16 -> 32 and standardises): resizing and standardisation run inside
    model.pt2, so the plain script's pixels give the leaderboard's test accuracy."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                    intermediate_size=64, image_size=32, patch_size=8)
    transformers.ViTModel(config, add_pooling_layer=False).save_pretrained(tmp_path / "vit")
    transformers.ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.3, 0.4, 0.5],
                                   image_std=[0.2, 0.25, 0.3]).save_pretrained(tmp_path / "vit")
    for name, airplane, seed in (("airplane", True, 0), ("not-airplane", False, 1)):
        _draw(tmp_path / "photos" / name, airplane, 14, seed)
        _draw(tmp_path / "test" / name, airplane, 10, seed + 10)
    code = main(["run", "--task", "image-folder", "--task-param", "path=photos",
                 "--task-param", "test_path=test", "--task-param", "episodes=split",
                 "--task-param", "size=16", "--task-param", "shots=2",
                 "--task-param", "queries=2", "--algorithms", "finetune,linear-probe",
                 "--sources", "transformers", "--param", f"transformers.path={tmp_path}/vit",
                 "--param", "finetune.finetune_lr=0.5", "--param", "finetune.optimizer=sgd",
                 "--no-baselines", "--trials", "2", "--meta-steps", "3", "--eval-every", "3",
                 "--top-k", "2", "--study", "vit", "--threads", "1", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    board = pd.read_csv(tmp_path / "autometa-reports" / "vit.csv")
    assert set(board["algorithm"]) == {"finetune", "linear-probe"}
    for row in board.itertuples():
        assert main(["export", "vit", "--rank", str(row.rank), "--out", f"rank{row.rank}"]) == 0
    counts = _plain(tmp_path / "test", [tmp_path / f"rank{r}" for r in board["rank"]])
    for row in board.itertuples():
        got = counts[f"rank{row.rank}"]
        assert got["n"] == row.test_n == 20
        assert got["correct"] == round(row.test_accuracy * row.test_n), (row.algorithm, got)


#: A few-shot model's pair in plain torch: adapt on each meta-test episode's support set,
#: predict its query set; the mean accuracy over episodes (the leaderboard's test score).
PAIR = '''
import json, pathlib, sys
import torch

folder = pathlib.Path(sys.argv[1])
adapt = torch.export.load(str(folder / "adapt.pt2")).module()
predict = torch.export.load(str(folder / "predict.pt2")).module()
episodes = torch.load(sys.argv[2], weights_only=True)
accuracies = []
with torch.no_grad():
    for sx, sy, qx, qy in zip(*(episodes[k] for k in ("sx", "sy", "qx", "qy"))):
        state = adapt(sx, sy)
        accuracies.append(float((predict(qx, *state).argmax(1) == qy).double().mean()))
assert not any(m.split(".")[0] in ("autometa", "autometa_plugins") for m in sys.modules)
print(json.dumps(accuracies))
'''


def test_few_shot_prototype_models_export_an_adapt_and_predict_pair(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """ProtoNet and nearest-centroid on glyphs: adapt.pt2 (a support set -> prototypes) and
    predict.pt2, run in plain torch on the meta-test episodes, give the leaderboard's score."""
    import autometa

    code = main(["run", "--task", "glyphs", "--task-param", "ways=3",
                 "--task-param", "shots=2", "--task-param", "queries=3",
                 "--task-param", "val_episodes=4", "--task-param", "test_episodes=6",
                 "--algorithms", "protonet,nearest-centroid", "--sources", "mlp",
                 "--no-baselines", "--trials", "2", "--meta-steps", "4", "--eval-every", "4",
                 "--top-k", "2", "--study", "glyphs", "--threads", "1", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    capsys.readouterr()
    board = pd.read_csv(tmp_path / "autometa-reports" / "glyphs.csv")
    assert set(board["algorithm"]) == {"protonet", "nearest-centroid"}
    # The meta-test episodes, saved as tensors for the script (which cannot render glyphs).
    episodes = autometa.load_model("glyphs").task.meta_test()
    episodes = episodes[:len(episodes)]
    torch.save({"sx": episodes.support_x.cpu(), "sy": episodes.support_y.cpu(),
                "qx": episodes.query_x.cpu(), "qy": episodes.query_y.cpu()}, "episodes.pt")
    for row in board.itertuples():
        out = f"rank{row.rank}"
        assert main(["export", "glyphs", "--rank", str(row.rank), "--out", out]) == 0
        said = capsys.readouterr().out.strip().splitlines()
        assert said[0].startswith(f"wrote {out}/model.pt, {out}/plan.json, {out}/adapt.pt2, "
                                  f"{out}/predict.pt2, {out}/model.json (study 'glyphs'")
        assert said[1] == ("model.pt2: not written: study 'glyphs' gives few-shot episodes: "
                           "adapt.pt2 adapts to a support set, predict.pt2 predicts with what "
                           "it gives (see model.json)")
        spec = json.loads((tmp_path / out / "model.json").read_text())
        assert spec["usage"] == ("state = adapt(support_x, support_y); "
                                 "scores = predict(x, *state)")
        done = subprocess.run([sys.executable, "-I", "-c", BLOCK + PAIR, str(tmp_path / out),
                               str(tmp_path / "episodes.pt")], capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        accuracies = json.loads(done.stdout.strip().splitlines()[-1])
        assert len(accuracies) == 6 == row.test_n
        # To the last query: as many correct of the 6 x 9 (the board's mean is float32).
        assert round(sum(accuracies) * 9) == round(row.test_accuracy * 6 * 9), row.algorithm
        assert np.mean(accuracies) == pytest.approx(row.test_accuracy, abs=1e-6)


def test_few_shot_gradient_winner_writes_no_program_and_says_what_to_use(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """MAML on sinusoid regression: adaptation is gradient steps, not a fixed program."""
    code = main(["run", "--task", "sinusoid", "--task-param", "val_episodes=4",
                 "--task-param", "test_episodes=4", "--task-param", "eval_queries=5",
                 "--algorithms", "maml", "--sources", "mlp", "--trials", "1",
                 "--meta-steps", "2", "--eval-every", "2", "--study", "waves",
                 "--threads", "1", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    capsys.readouterr()
    assert main(["export", "waves", "--out", "model"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0].startswith("wrote model/model.pt, model/plan.json (study 'waves'")
    assert len(out) == 2 and out[1].startswith(
        "model.pt2: not written: study 'waves' gives few-shot episodes, so its model has no "
        "support set of its own, and maml adapts to each support set by steps in Python"), out
    assert "autometa predict waves --rank 1 --support DIR" in out[1]
    assert "autometa.load_model('waves').adapt(support_x, support_y).predict(x)" in out[1]
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == ["model.pt", "plan.json"]

    # A trial whose stored state is gone: one line, exit 2, nothing written.
    import shutil

    shutil.rmtree(tmp_path / "autometa-artifacts")
    assert main(["export", "waves", "--out", "again"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("autometa: error: trial 0"), err
    assert "state" in err[0] and not (tmp_path / "again" / "model.pt").exists()


class _DataDependent(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # a Python branch on a tensor's value: not one program
            return x * 2
        return x


def test_a_model_torch_export_cannot_trace_is_one_line() -> None:
    with pytest.raises(ConfigError) as caught:
        trace(_DataDependent(), torch.ones(2, 3), "algo + source")
    message = str(caught.value)
    assert "\n" not in message and message.startswith(
        "model.pt2: torch.export cannot trace the adapted model of algo + source (")
    assert message.endswith("model.pt and plan.json are written: load it with "
                            "autometa.load_model, or use `autometa predict`")


def test_csv_regression_program_gives_the_predictors_values(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A target task that is not images: float32 rows in, encoded as the task encodes
    them; regression values out in the target's units (the CSV's standardisation undone)."""
    import autometa

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=60), rng.normal(size=60)
    pd.DataFrame({"a": a, "b": b, "price": 100 + 20 * a - 5 * b}).to_csv("houses.csv",
                                                                          index=False)
    autometa.search("csv", algorithms=["finetune"], sources=["mlp"], n_trials=1, seed=0,
                    baselines=False, study_name="houses", meta_steps=4, eval_every=4,
                    task_params={"path": "houses.csv", "target": "price", "shots": 5,
                                 "queries": 5})
    assert main(["export", "houses", "--out", "model"]) == 0
    assert "model/model.pt2, model/model.json" in capsys.readouterr().out
    spec = json.loads((tmp_path / "model" / "model.json").read_text())
    assert spec["input"]["dtype"] == "float32" and spec["input"]["shape"] == ["N", 2]
    assert spec["output"] == {"kind": "regression", "shape": ["N", 1],
                              "values": "in the target's units"}
    model = autometa.load_model("houses")
    x = model.task.meta_test()[:1].query_x[0]  # the test rows, as the task encodes them
    program = torch.export.load(str(tmp_path / "model" / "model.pt2")).module()
    values = program(x)
    torch.testing.assert_close(values, model.predict(x).values, rtol=1e-5, atol=1e-4)
    assert 40 < float(values.mean()) < 160  # the target's units, not standardised ones


def test_the_kit_catches_an_adapted_module_that_is_not_the_adapted_model() -> None:
    """The conformance kit compares adapted_module's predictions with adapt_and_predict's
    (model.pt2 is that module): one that skips adaptation is caught, naming the method."""
    from autometa.testing import check_meta_algorithm
    from autometa_plugins.maml.algorithm import MAML
    from autometa_plugins.mlp.model import MLP
    from autometa_plugins.sinusoid.task import Sinusoid

    task = Sinusoid(seed=0, val_episodes=4, test_episodes=4, eval_queries=5)

    class Unadapted(MAML):  # the meta-learned initialisation, not the adapted parameters
        def adapted_module(self, support_x, support_y):
            import copy

            return copy.deepcopy(self.model)

    with pytest.raises(AssertionError, match=r"adapted_module.*not adapt_and_predict's"):
        check_meta_algorithm(Unadapted, task, MLP, {"hidden": 8}, meta_batch_size=2)
    check_meta_algorithm(MAML, task, MLP, {"hidden": 8}, meta_batch_size=2)  # the real one


def test_model_json_flags_a_network_normalised_by_each_batch() -> None:
    """conv4 and resnet12 meta-learn with BatchNorm without running statistics: a
    prediction then depends on its batch, which model.json and export's notes say."""
    from torch import nn

    from autometa.export_program import batch_statistics

    assert batch_statistics(nn.Sequential(nn.Conv2d(1, 2, 3),
                                          nn.BatchNorm2d(2, track_running_stats=False)))
    assert not batch_statistics(nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)))
    assert not batch_statistics(nn.Linear(2, 2))
