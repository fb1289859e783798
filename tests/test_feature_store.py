"""Frozen features computed once per (source, weights, data) and shared: the baselines score
the same with and without the store, the network embeds the examples once, a changed
weights file gets a new store, concurrent processes build one, a batch-statistics BatchNorm
falls back, and ``autometa cache`` lists and clears the stores (README: Baselines)."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
from limits import QUICK_SUBPROCESS
from PIL import Image
from torch import nn

import autometa
from autometa import feature_store
from autometa.cli import main
from autometa.image_store import FileImages, StoredImages, open_store
from autometa.study.trials import TrialPlan
from autometa.task import TaskSpec
from autometa_plugins.mlp.model import MLP

TASK = {"size": 16, "ways": 3, "shots": 2, "queries": 2, "val_episodes": 5,
        "test_episodes": 7, "val_fraction": 0.25, "test_fraction": 0.25}
SPEC = TaskSpec("classification", (3, 16, 16), 3)


def write_classes(root: Path, classes: int = 12, per_class: int = 10) -> Path:
    """Colour-coded classes of noisy 16 px images (seeded)."""
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"c{c:02d}").mkdir(parents=True, exist_ok=True)
        base = rng.integers(0, 256, (3,))
        for i in range(per_class):
            pixels = np.clip(base + rng.normal(0, 40, (16, 16, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / f"c{c:02d}" / f"{i}.png")
    return root


def write_weights(path: Path, seed: int) -> Path:
    """An MLP's state (no BatchNorm: per-example features) as a checkpoint file."""
    torch.manual_seed(seed)
    torch.save(MLP(hidden=16).build(SPEC).state_dict(), path)
    return path


def search(tmp: Path, name: str, weights: Path, arch: str = "mlp",
           arch_params: dict | None = None) -> dict[int, tuple]:
    """The baselines (and one nearest-centroid trial) on the checkpoint source: each trial's
    meta-val score, per-episode meta-val scores and meta-test score."""
    autometa.search(
        "image-folder", task_params={"path": str(tmp / "images"), **TASK},
        algorithms=["nearest-centroid"], sources=["checkpoint"], n_trials=1,
        source_params={"checkpoint": {"path": str(weights), "arch": arch,
                                      "arch_params": arch_params or {"hidden": 16}}},
        meta_steps=1, eval_every=1, study_name=name, cache_dir=str(tmp / "cache"),
        storage=f"sqlite:///{tmp / 'studies.db'}", artifacts=str(tmp / f"art-{name}"))
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{tmp / 'studies.db'}")
    out = {}
    for t in study.trials:
        plan = TrialPlan.of(t)
        out[t.number] = ((plan.algorithm, plan.source), t.value, t.user_attrs.get("val_scores"),
                         t.user_attrs.get("test_scores"), t.user_attrs.get("test_mean"))
    return out


def features_files(tmp: Path) -> list[Path]:
    return sorted((tmp / "cache" / "stores").glob("features-*.f32"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, dict, dict, list]:
    tmp = tmp_path_factory.mktemp("features")
    write_classes(tmp / "images")
    weights = write_weights(tmp / "w.pt", seed=0)
    with feature_store.disabled():
        plain = search(tmp, "plain", weights)
    assert features_files(tmp) == []  # disabled: nothing stored
    cached = search(tmp, "cached", weights)
    built = features_files(tmp)
    stamp = [(p.stat().st_ino, p.stat().st_mtime_ns) for p in built]
    again = search(tmp, "again", weights)
    return tmp, plain, cached, again, [built, stamp]


def test_the_baselines_score_the_same_with_stored_features(runs: tuple) -> None:
    _, plain, cached, again, _ = runs
    assert len(plain) == 7  # 3 baselines on raw, 3 on checkpoint, 1 searched
    # Per trial: plan, meta-val score, per-episode meta-val and meta-test scores, test
    # mean. Accuracies of the same predictions: equal, not merely close.
    assert cached == plain
    assert again == plain


def test_the_network_embeds_the_examples_once_and_later_runs_reuse_them(runs: tuple) -> None:
    tmp, _, _, _, (built, stamp) = runs
    assert len(built) == 1  # one store for the 3 baselines + the searched trial
    assert [(p.stat().st_ino, p.stat().st_mtime_ns) for p in features_files(tmp)] == stamp


def test_stored_features_are_the_networks_features_of_each_example(runs: tuple) -> None:
    tmp = runs[0]
    torch.manual_seed(0)
    net = MLP(hidden=16).build(SPEC)
    net.load_state_dict(torch.load(tmp / "w.pt", weights_only=True))
    files = sorted((tmp / "images").rglob("*.png"))
    store = StoredImages(open_store(FileImages(files, slot="t"), name="t", size=16,
                                    channels=3, cache_dir=tmp / "other"), "cpu")
    rows = torch.tensor([0, 3, 17, 55, 119])
    got = feature_store.embed(net.features, store, rows, identity={"source": "t", "params": {}},
                              device=torch.device("cpu"))
    assert got is not None
    with torch.no_grad():  # one example at a time: the independent reference
        expected = torch.cat([net.features(store.gather(r[None])) for r in rows])
    torch.testing.assert_close(got.gather(rows, torch.device("cpu")), expected,
                               rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got.gather(rows[[4, 0]][None], torch.device("cpu"))[0],
                               expected[[4, 0]], rtol=1e-6, atol=1e-6)
    assert got.covers(rows[1:]) and not got.covers(torch.tensor([1]))


def test_changed_weights_get_a_new_store_and_the_old_one_goes(tmp_path: Path) -> None:
    write_classes(tmp_path / "images")
    first = search(tmp_path, "one", write_weights(tmp_path / "w.pt", seed=0))
    old = features_files(tmp_path)
    second = search(tmp_path, "two", write_weights(tmp_path / "w.pt", seed=1))
    new = features_files(tmp_path)
    assert len(old) == len(new) == 1 and old != new
    checkpoint = [n for n, row in first.items() if row[0][1] == "checkpoint"]
    assert [first[n][2] for n in checkpoint] != [second[n][2] for n in checkpoint]


def test_a_batchnorm_without_running_statistics_falls_back(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from autometa_plugins.conv4.model import Conv4

    write_classes(tmp_path / "images")
    torch.manual_seed(0)
    torch.save(Conv4(channels=4).build(SPEC).state_dict(), tmp_path / "c.pt")
    with feature_store.disabled():
        plain = search(tmp_path, "plain", tmp_path / "c.pt", "conv4", {"channels": 4})
    with caplog.at_level(logging.INFO, logger="autometa.feature_store"):
        fallback = search(tmp_path, "bn", tmp_path / "c.pt", "conv4", {"channels": 4})
    assert fallback == plain and features_files(tmp_path) == []
    assert "normalises with each batch's statistics" in caplog.text
    # Its features of one example do depend on the batch: the store would be wrong.
    net = Conv4(channels=4).build(SPEC).eval()
    assert feature_store.per_example(net.features, torch.rand(8, 3, 16, 16)) is not None
    tracked = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten()).eval()
    assert feature_store.per_example(tracked, torch.rand(8, 3, 16, 16)) is None


class Mixer(nn.Module):
    """Adds the batch mean: batch-dependent without any BatchNorm (caught by the probe)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) + x.flatten(1).mean(0)


def test_the_probe_catches_other_batch_dependent_networks() -> None:
    assert "depend on the other examples" in str(
        feature_store.per_example(Mixer(), torch.rand(8, 3, 4, 4)))


CONCURRENT = """
import sys, torch
from pathlib import Path
from torch import nn
from autometa import feature_store
from autometa.image_store import FileImages, StoredImages, open_store
from autometa.study.trials import TrialPlan

class Counting(nn.Sequential):
    def forward(self, x):
        with open(sys.argv[2], "a") as log:
            log.write(f"{len(x)}\\n")
        return super().forward(x)

torch.manual_seed(0)
net = Counting(nn.Flatten(), nn.Linear(3 * 16 * 16, 5)).eval()
files = sorted(Path(sys.argv[1]).rglob("*.png"))
images = StoredImages(open_store(FileImages(files, slot="x"), name="t", size=16, channels=3,
                                 cache_dir=sys.argv[3]), "cpu")
store = feature_store.embed(net, images, torch.arange(0, 120, 3),
                            identity={"source": "counting", "params": {}},
                            device=torch.device("cpu"))
print(store.path, float(torch.from_numpy(store.features[:]).double().sum()))
"""


def test_concurrent_processes_embed_once_and_read_the_same_store(tmp_path: Path) -> None:
    write_classes(tmp_path / "images")
    script = tmp_path / "embed.py"
    script.write_text(CONCURRENT)
    log = tmp_path / "batches.log"
    procs = [subprocess.Popen([sys.executable, str(script), str(tmp_path / "images"),
                               str(log), str(tmp_path / "cache")], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outs = [p.communicate(timeout=QUICK_SUBPROCESS) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1] for o in outs]
    assert len({o[0] for o in outs}) == 1  # the same store, the same numbers
    batches = log.read_text().split()
    # Each process probes (8, then 4 + 4 examples); one of them embeds the 40 rows.
    assert batches.count("40") == 1 and sorted(set(batches)) == ["4", "40", "8"]


def test_autometa_cache_lists_and_clears_feature_stores(
        runs: tuple, capsys: pytest.CaptureFixture[str]) -> None:
    tmp = runs[0]
    copy = tmp / "listed"
    (copy / "stores").mkdir(parents=True)
    for path in (tmp / "cache" / "stores").iterdir():
        (copy / "stores" / path.name).write_bytes(path.read_bytes())
    assert main(["cache", "--cache-dir", str(copy)]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if "features of checkpoint" in x)
    assert "partial" not in line and "x16  -" in line  # (examples)x(d=16), no resize
    assert "2 store(s)" in out  # the decoded images and the features
    assert main(["cache", "clear", "--cache-dir", str(copy)]) == 0
    assert "removed 2 store(s)" in capsys.readouterr().out
    assert not (copy / "stores").exists()
