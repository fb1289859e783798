"""The first-party catalogue: every entry is listed, every task runs in a small search, and
every meta-algorithm is searched together in one study."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from limits import QUICK_SUBPROCESS
from optuna.distributions import CategoricalDistribution
from PIL import Image

import autometa
from autometa.study.storage import open_storage

TASKS = ["breast-cancer", "csv", "digits", "digits-vs-rest", "glyphs", "image-folder", "iris",
         "meta-album", "sinusoid", "wine"]
SOURCES = ["checkpoint", "conv4", "mlp", "pretrained", "raw", "resnet12", "timm", "torchvision",
           "transformers"]
ALGORITHMS = ["anil", "finetune", "linear-probe", "linear-svm", "maml", "metasgd",
              "nearest-centroid", "pmf", "protonet", "reptile"]


def test_plugins_lists_every_task_source_model_and_algorithm(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "autometa", "plugins"], cwd=tmp_path,
                            capture_output=True, text=True, env={"COLUMNS": "250",
                                                                 "PATH": "/usr/bin:/bin"},
                            timeout=QUICK_SUBPROCESS)
    assert result.returncode == 0, result.stderr
    for kind, names in (("task", TASKS), ("source model", SOURCES),
                        ("meta-algorithm", ALGORITHMS)):
        for name in names:
            assert f"{kind} {name}" in result.stdout, (kind, name)
    assert "broken" not in result.stdout


def _csv(path: Path) -> dict:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 3))
    pd.DataFrame({"a": x[:, 0], "b": x[:, 1], "colour": rng.choice(["red", "blue"], 60),
                  "y": np.where(x[:, 0] + x[:, 1] > 0, "yes", "no")}).to_csv(path, index=False)
    return {"path": str(path), "target": "y"}


def _folder(root: Path) -> dict:
    rng = np.random.default_rng(0)
    for c in range(6):
        (root / f"class-{c}").mkdir(parents=True)
        for i in range(4):
            pixels = (rng.random((10, 10)) * 80 + 30 * c).astype(np.uint8)
            Image.fromarray(pixels).save(root / f"class-{c}" / f"{i}.png")
    return {"path": str(root), "ways": 2, "shots": 1, "queries": 2, "val_fraction": 0.34,
            "test_fraction": 0.34, "val_episodes": 3, "test_episodes": 3, "size": 8}


def _album(root: Path) -> dict:
    """Two Meta-Album datasets (labels.csv + images/) of 6 classes of 3 images."""
    rng = np.random.default_rng(0)
    for d, name in enumerate(("BCT", "FLW")):
        (root / name / "images").mkdir(parents=True)
        rows = ["FILE_NAME,CATEGORY,SUPER_CATEGORY"]
        for c in range(6):
            for i in range(3):
                pixels = (rng.random((8, 8, 3)) * 80 + 20 * c + 100 * d).astype(np.uint8)
                Image.fromarray(pixels).save(root / name / "images" / f"{c}-{i}.png")
                rows.append(f"{c}-{i}.png,class {c},NAN")
        (root / name / "labels.csv").write_text("\n".join(rows) + "\n")
    return {"path": str(root), "ways": 2, "shots": 1, "queries": 2, "val_fraction": 0.34,
            "test_fraction": 0.34, "val_episodes": 4, "test_episodes": 4, "size": 8}


FEW = {"val_episodes": 3, "test_episodes": 3}
#: Small settings per task, and a compatible source model and algorithm.
SMALL = {
    "sinusoid": ({"val_episodes": 3, "test_episodes": 3, "eval_queries": 5}, "mlp", "maml"),
    "digits": ({"ways": 3, "shots": 1, "queries": 2, **FEW}, "conv4", "protonet"),
    "digits-vs-rest": ({}, "mlp", "linear-probe"),
    "glyphs": ({"ways": 3, "shots": 1, "queries": 2, "train_classes": 10, "val_classes": 3,
                "test_classes": 3, "examples": 4, **FEW}, "conv4", "anil"),
    "iris": ({}, "mlp", "finetune"),
    "wine": ({}, "mlp", "reptile"),
    "breast-cancer": ({}, "mlp", "metasgd"),
}


@pytest.mark.parametrize("task", TASKS)
def test_every_task_runs_in_a_small_search(task: str, tmp_path: Path) -> None:
    if task == "csv":
        params, source, algorithm = _csv(tmp_path / "data.csv"), "mlp", "maml"
    elif task == "image-folder":
        params, source, algorithm = _folder(tmp_path / "images"), "conv4", "finetune"
    elif task == "meta-album":
        params, source, algorithm = _album(tmp_path / "album"), "conv4", "protonet"
    else:
        params, source, algorithm = SMALL[task]
    source_params = {"conv4": {"channels": 32}, "mlp": {"hidden": 40, "layers": 1}}[source]
    board = autometa.search(task, task_params=params, algorithms=[algorithm], sources=[source],
                            source_params={source: source_params}, n_trials=1, meta_steps=2,
                            eval_every=2, top_k=1, storage=f"sqlite:///{tmp_path / 'a.db'}",
                            artifacts=str(tmp_path / "art"))
    searched = board.frame[~board.frame["baseline"]]  # a baseline may rank above it
    assert len(searched) == 1
    row = searched.iloc[0]
    assert (row["algorithm"], row["source"]) == (algorithm, source)
    assert np.isfinite(row[f"test_{board.metric}"]) and row["test_n"] > 0


def test_every_algorithm_is_searched_in_one_study(tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path / 'a.db'}"
    board = autometa.search(
        "digits", task_params={"ways": 3, "shots": 1, "queries": 2, **FEW},
        sources=["mlp"], source_params={"mlp": {"hidden": 40, "layers": 1}},
        algorithm_params={"finetune": {"optimizer": "sgd", "finetune_steps": 10},
                          "reptile": {"eval_steps": 5}},
        n_trials=12, meta_steps=2, eval_every=2, pruner="none", storage=storage,
        artifacts=str(tmp_path / "art"))
    import optuna

    study = optuna.load_study(study_name=board.study_name, storage=open_storage(storage))
    # one space over all of them (baseline trials sample nothing), but the baselines' own
    # (nearest-centroid, linear-svm) and pmf's: searched only when named
    choices = {t.distributions["algorithm"] for t in study.trials
               if not t.user_attrs.get("baseline")}
    searched = [a for a in ALGORITHMS if a not in ("nearest-centroid", "linear-svm", "pmf")]
    assert choices == {CategoricalDistribution(searched)}
    # 12 searched trials, and 3 baselines on the raw inputs (mlp's features are not frozen)
    assert board.counts["complete"] == 12 + 3 and board.counts["failed"] == 0
    assert len(set(board.frame["algorithm"])) >= 5  # the sampler tried most of them
