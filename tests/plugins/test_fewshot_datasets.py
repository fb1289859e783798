"""fewshot-datasets: the field's benchmarks read from local files in their published layouts.

Each test writes a tiny dataset in exactly its published format (CSVs, class folders, CUB's
txt lists, CIFAR-100's and tieredImageNet's pickles as Python 2 wrote them) with a few
classes of 12x12 images, and builds the task through the real plugin. Every class's images
have one grey level (or red level, for CIFAR) of their own, so a decoded image tells which
class it came from: the tests check which class names land in each split and that
episodes only show their own split's images. Nothing is downloaded.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from collections.abc import Callable
from datetime import date
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from fewshot_layouts import (
    CUB_CLASSES,
    MINI,
    SPLITS,
    SUPERCLASS,
    TIERED,
    check_splits,
    cifar_class,
    class_of,
    image,
    png_bytes,
    write_cifar,
    write_cub,
    write_mini,
    write_omniglot,
    write_tiered_folders,
    write_tiered_pickles,
)
from limits import CLI_SEARCH, QUICK_SUBPROCESS

from autometa import ConfigError, DataError
from autometa.testing import check_task
from autometa_plugins.fewshot_datasets.cifar import FC100, CifarFS
from autometa_plugins.fewshot_datasets.cub import CUB
from autometa_plugins.fewshot_datasets.mini_imagenet import MiniImageNet
from autometa_plugins.fewshot_datasets.omniglot import Omniglot
from autometa_plugins.fewshot_datasets.tiered_imagenet import TieredImageNet

EPISODES = {"ways": 2, "shots": 1, "queries": 2, "val_episodes": 4, "test_episodes": 4}
SMALL = {**EPISODES, "size": 12}


# -- each format: the contract, its published split, its images ---------------------------------
def test_mini_imagenet(tmp_path: Path) -> None:
    names = write_mini(tmp_path / "mini")
    task = check_task(MiniImageNet, path=str(tmp_path / "mini"), **SMALL)
    assert task.input_shape == (3, 12, 12) and task.images.shape == (21, 3, 12, 12)
    expected = dict(zip(SPLITS, (sorted(c) for c in MINI.values()), strict=True))
    check_splits(task, expected, names)
    assert task.describe()["split_from"] == {"meta-train": "train.csv", "meta-val": "val.csv",
                                             "meta-test": "test.csv"}
    big = MiniImageNet(path=tmp_path / "mini", **EPISODES)  # the default size, 84
    assert big.input_shape == (3, 84, 84) and big.meta_test().query_x.shape == (4, 4, 3, 84, 84)


@pytest.mark.parametrize("form", ["folders", "pickles"])
def test_tiered_imagenet(tmp_path: Path, form: str) -> None:
    write = write_tiered_folders if form == "folders" else write_tiered_pickles
    names = write(tmp_path / "tiered")
    task = check_task(TieredImageNet, path=str(tmp_path / "tiered"), **SMALL)
    assert task.input_shape == (3, 12, 12) and len(task.images) == 21
    expected = dict(zip(SPLITS, TIERED.values(), strict=True))
    if form == "folders":  # a split's classes are its sorted folders
        expected = {s: sorted(c) for s, c in expected.items()}
    check_splits(task, expected, names)
    assert task.describe()["format"] == ("class folders" if form == "folders" else
                                         "Ren et al.'s PNG pickles")


def test_cifar_fs_uses_bertinetto_split(tmp_path: Path) -> None:
    task = check_task(CifarFS, path=str(write_cifar(tmp_path / "cifar")), **EPISODES)
    assert task.input_shape == (3, 32, 32) and len(task.images) == 300
    split = task.describe()["classes_by_split"]
    assert [len(split[s]) for s in SPLITS] == [64, 16, 20]
    assert {"dolphin", "apple", "wolf"} <= set(split["meta-train"])
    assert {"beaver", "otter", "television"} <= set(split["meta-val"])
    assert {"whale", "poppy", "woman"} <= set(split["meta-test"])
    x = task.images.gather(torch.arange(3))  # (3, C, 32, 32): the R, G, B planes unmixed
    assert torch.allclose(x[:, 1, :16], torch.tensor(200 / 255)) and float(x[:, 1, 16:].max()) == 0
    for name, episodes in zip(SPLITS, (task.sample(4, torch.Generator().manual_seed(0)),
                                       task.meta_val(), task.meta_test()), strict=True):
        images = torch.cat([episodes.support_x, episodes.query_x], 1).flatten(0, 1)
        assert {cifar_class(p) for p in images} <= set(split[name])


def test_cifar_fs_reads_split_lists_when_given(tmp_path: Path) -> None:
    root = write_cifar(tmp_path / "cifar")
    lists = {"train": ["worm", "apple", "tank"], "val": ["whale", "bus"],
             "test": ["dolphin", "rose"]}
    (root / "splits" / "bertinetto").mkdir(parents=True)
    for split, classes in lists.items():
        (root / "splits" / "bertinetto" / f"{split}.txt").write_text("\n".join(classes) + "\n")
    task = CifarFS(path=root, **SMALL)
    assert task.describe()["classes_by_split"] == dict(zip(SPLITS, lists.values(), strict=True))
    assert task.input_shape == (3, 12, 12)


def test_fc100_splits_by_superclass(tmp_path: Path) -> None:
    task = check_task(FC100, path=str(write_cifar(tmp_path / "cifar")), **EPISODES)
    CifarFS(path=tmp_path / "cifar", **EPISODES)
    stores = list((tmp_path.parent / f"{tmp_path.name}-cache" / "stores").glob("*.u8"))
    assert len(stores) == 1  # both read CIFAR-100's images: one store
    split = task.describe()["classes_by_split"]
    assert [len(split[s]) for s in SPLITS] == [60, 20, 20]
    assert {SUPERCLASS[c] for c in split["meta-val"]} == {
        "large_carnivores", "large_omnivores_and_herbivores", "non-insect_invertebrates",
        "small_mammals"}
    assert {SUPERCLASS[c] for c in split["meta-test"]} == {
        "aquatic_mammals", "insects", "medium_mammals", "people"}
    assert len({SUPERCLASS[c] for c in split["meta-train"]}) == 12
    episodes = task.meta_test()
    images = torch.cat([episodes.support_x, episodes.query_x], 1).flatten(0, 1)
    assert {cifar_class(p) for p in images} <= set(split["meta-test"])


def test_cub_uses_chen_et_al_split(tmp_path: Path) -> None:
    names = write_cub(tmp_path / "CUB_200_2011")
    task = check_task(CUB, path=str(tmp_path / "CUB_200_2011"), **SMALL)
    # sorted folders 0..7: even -> train, 1 and 5 -> val, 3 and 7 -> test
    check_splits(task, {"meta-train": [names[0], names[2], names[4], names[6]],
                        "meta-val": [names[1], names[5]], "meta-test": [names[3], names[7]]},
                 names)
    (tmp_path / "CUB_200_2011" / "splits").mkdir()
    for split, classes in (("train", names[5:]), ("val", names[:2]), ("test", names[2:4])):
        (tmp_path / "CUB_200_2011" / "splits" / f"{split}.txt").write_text("\n".join(classes))
    listed = CUB(path=tmp_path / "CUB_200_2011", **SMALL)
    check_splits(listed, {"meta-train": names[5:], "meta-val": names[:2],
                          "meta-test": names[2:4]}, names)


def test_omniglot_holds_out_whole_background_alphabets(tmp_path: Path) -> None:
    names = write_omniglot(tmp_path / "omniglot")
    task = check_task(Omniglot, path=str(tmp_path / "omniglot"), val_alphabets=1, **SMALL)
    facts = task.describe()
    (val,) = facts["val_alphabets"]
    assert val in {"Bengali", "Greek", "Latin", "Tifinagh"}
    check_splits(task, {
        "meta-train": [n for n in names[:8] if not n.startswith(f"{val}/")],
        "meta-val": [f"{val}/character01", f"{val}/character02"],
        "meta-test": names[8:]}, names)
    drawn = {Omniglot(path=tmp_path / "omniglot", val_alphabets=1, seed=s, **SMALL)
             .describe()["val_alphabets"][0] for s in range(8)}
    assert len(drawn) > 1  # the held-out alphabet follows the seed
    default = Omniglot(path=tmp_path / "omniglot", val_alphabets=2, **EPISODES)
    assert default.input_shape == (1, 28, 28)  # Omniglot's defaults: 28 px, grayscale


def test_new_images_are_decoded_as_the_task_decodes_its_own(tmp_path: Path) -> None:
    """`autometa predict`'s inputs: files or a folder; a support set of class folders."""
    names = write_mini(tmp_path / "mini")
    task = MiniImageNet(path=tmp_path / "mini", **SMALL)
    batch = task.read_inputs(tmp_path / "mini" / "images", labelled=False)
    assert batch.x.shape == (21, 3, 12, 12) and batch.labels is None and batch.id_name == "file"
    assert batch.ids[0] == "n0000000100000001.jpg" and batch.ids == sorted(batch.ids)
    stored = {file.name: i for i, file in enumerate(task.layout.source.files)}
    assert torch.equal(batch.x, task.images.gather(torch.tensor([stored[i] for i in batch.ids])))
    for wnid in ("n05000000", "n00000001"):  # a support set: one folder per class
        (tmp_path / "support" / wnid).mkdir(parents=True)
        image(names.index(wnid), "RGB", 5).save(tmp_path / "support" / wnid / "a.png")
    support = task.read_inputs(tmp_path / "support", labelled=True)
    assert support.labels == ["n00000001", "n05000000"] and support.x.shape == (2, 3, 12, 12)
    assert [class_of(x, names) for x in support.x] == support.labels
    one = task.read_inputs(tmp_path / "support" / "n05000000" / "a.png", labelled=False)
    assert one.x.shape == (1, 3, 12, 12) and one.ids == ["a.png"]
    with pytest.raises(DataError, match=r"^mini-imagenet: --support '.*a.png' is a file"):
        task.read_inputs(tmp_path / "support" / "n05000000" / "a.png", labelled=True)


# -- bad input: one line each, nothing decoded ---------------------------------------------------
def _unlink(path: Path) -> None:
    path.unlink()


def _cifar_lists(root: Path, val: str) -> None:
    write_cifar(root)
    (root / "splits" / "bertinetto").mkdir(parents=True)
    for split, text in (("train", "apple\nbus\n"), ("val", val), ("test", "rose\nworm\n")):
        (root / "splits" / "bertinetto" / f"{split}.txt").write_text(text)


def _foreign_pickle(root: Path) -> None:
    write_cifar(root)
    (root / "cifar-100-python" / "meta").write_bytes(pickle.dumps({b"when": date(2009, 4, 8)}))


def _append(path: Path, text: str) -> None:
    with open(path, "a") as f:
        f.write(text)


CASES: dict[str, tuple[type, Callable[[Path], object], dict, type[Exception], list[str]]] = {
    "mini: no path": (MiniImageNet, lambda r: None, {"path": None}, ConfigError,
                      ["give the dataset's folder", "path/train.csv", "path/images/<filename>"]),
    "mini: no such folder": (MiniImageNet, lambda r: None, {"path": "nowhere"}, DataError,
                             ["'nowhere' does not exist", "path/train.csv"]),
    "mini: missing csv": (MiniImageNet, lambda r: (write_mini(r), _unlink(r / "val.csv")), {},
                          DataError, ["val.csv' is missing", "the layout is path/train.csv"]),
    "mini: missing images": (
        MiniImageNet, lambda r: (write_mini(r), _unlink(r / "images" / "n0900000000000001.jpg"),
                                 _unlink(r / "images" / "n0150000000000003.jpg")), {}, DataError,
        ["val.csv names 2 image(s) missing from", "'n0900000000000001.jpg' (val.csv line 2) "
         "(and 1 more missing)"]),
    "mini: bad header": (
        MiniImageNet, lambda r: (write_mini(r), (r / "test.csv").write_text("file,class\na,n1\n")),
        {}, DataError, ["starts with 'file,class'", "'filename,label'"]),
    "mini: class in two splits": (
        MiniImageNet, lambda r: (write_mini(r), _append(r / "test.csv", "n0300000100000001.jpg,"
                                                       "n03000001\n")), {}, DataError,
        ["class 'n03000001' is in both train.csv and test.csv"]),
    "mini: too few images": (MiniImageNet, write_mini, {"shots": 2}, DataError,
                             ["has 3 image(s), fewer than shots + queries = 4",
                              "(and 6 other class(es))", "lower 'shots' or 'queries'"]),
    "mini: more ways than classes": (MiniImageNet, write_mini, {"ways": 3}, DataError,
                                     ["3-way episodes need 3 classes", "meta-val (val.csv) has 2",
                                      "lower 'ways'"]),
    "tiered: missing split folder": (
        TieredImageNet, lambda r: (write_tiered_folders(r), os.rename(r / "val", r / "valid")), {},
        DataError, ["val' is missing", "path/{train,val,test}/<wnid>/<image>"]),
    "tiered: missing labels pickle": (
        TieredImageNet, lambda r: (write_tiered_pickles(r), _unlink(r / "test_labels.pkl")), {},
        DataError, ["test_labels.pkl' is missing", "Ren et al.'s pickles"]),
    "tiered: labels pickle without names": (
        TieredImageNet, lambda r: (write_tiered_pickles(r), (r / "val_labels.pkl").write_bytes(
            pickle.dumps({b"label_specific": np.zeros(6, np.int32)}, protocol=2))), {}, DataError,
        ["val_labels.pkl' has no key 'label_specific_str'", "this file has label_specific"]),
    "tiered: images and labels of two releases": (
        TieredImageNet, lambda r: (write_tiered_pickles(r), (r / "test_images_png.pkl")
                                   .write_bytes(pickle.dumps([png_bytes(0)], protocol=2))), {},
        DataError, ["test_images_png.pkl' holds 1 image(s), but its labels pickle labels 6"]),
    "cifar: missing meta": (CifarFS, lambda r: (write_cifar(r), _unlink(
        r / "cifar-100-python" / "meta")), {}, DataError,
        ["cifar-100-python/meta' is missing", "path/cifar-100-python/{train,test,meta}"]),
    "cifar: pickle without coarse labels": (
        FC100, lambda r: write_cifar(r, drop="coarse_labels"), {}, DataError,
        ["cifar-100-python/train' has no key 'coarse_labels'", "this file has batch_label, data"]),
    "cifar: a Python object in a pickle": (
        CifarFS, _foreign_pickle, {}, DataError,
        ["meta' holds a Python object datetime.date", "only data are read from pickles"]),
    "cifar: unknown class in a split list": (
        CifarFS, lambda r: _cifar_lists(r, "whale\nbeever\notterr\n"), {}, DataError,
        ["val.txt' names 2 class(es) that CIFAR-100's meta (fine_label_names) does not have",
         "'beever' (line 2) (and 1 more unknown)"]),
    "cifar: missing split list": (
        CifarFS, lambda r: (_cifar_lists(r, "whale\nbus\n"),
                            _unlink(r / "splits" / "bertinetto" / "test.txt")), {}, DataError,
        ["splits/bertinetto/test.txt' is missing"]),
    "cifar: too few images": (CifarFS, lambda r: write_cifar(r, per_class=(1, 1)), {}, DataError,
                              ["has 2 image(s), fewer than shots + queries = 3"]),
    "cub: missing labels file": (CUB, lambda r: (write_cub(r), _unlink(
        r / "image_class_labels.txt")), {}, DataError, ["image_class_labels.txt' is missing",
                                                       "CUB-200-2011's path/classes.txt"]),
    "cub: missing images": (CUB, lambda r: (write_cub(r), _unlink(
        r / "images" / CUB_CLASSES[7] / "Bird_Crow_0001.jpg")), {}, DataError,
        ["images.txt names 1 image(s) missing from",
         "'008.Bird_Crow/Bird_Crow_0001.jpg' (line 2)"]),
    "cub: unknown class id": (
        CUB, lambda r: (write_cub(r), _append(r / "images.txt", "25 x/y.jpg\n"),
                        _append(r / "image_class_labels.txt", "25 201\n")), {}, DataError,
        ["names 1 class id(s) not in classes.txt", "class 201 (image_class_labels.txt line 25)"]),
    "omniglot: missing evaluation": (Omniglot, lambda r: (write_omniglot(r), os.rename(
        r / "images_evaluation", r / "images_eval")), {}, DataError,
        ["images_evaluation' is missing", "(meta-test)"]),
    "omniglot: too many val alphabets": (Omniglot, write_omniglot, {"val_alphabets": 4},
                                         DataError, ["val_alphabets=4 leaves no background",
                                                     "has 4"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_clear_error(tmp_path: Path, case: str) -> None:
    task_cls, setup, params, error, expected = CASES[case]
    root = tmp_path / "data"
    setup(root)
    with pytest.raises(error) as raised:
        task_cls(**{"path": str(root), **SMALL, **params})
    message = str(raised.value)
    assert message.startswith(f"{task_cls.name}: ") and "\n" not in message, message
    for part in expected:
        assert part in message, message
    stores = tmp_path.parent / f"{tmp_path.name}-cache" / "stores"
    assert not stores.exists() or not list(stores.glob("*.u8")), "decoded before the check"


# -- the CLI -------------------------------------------------------------------------------------
def autometa_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "autometa", *args], cwd=cwd,
                          env={**os.environ, "COLUMNS": "250"}, capture_output=True, text=True,
                          timeout=CLI_SEARCH)


def test_cli_searches_mini_imagenet_and_refuses_a_broken_one(tmp_path: Path) -> None:
    write_mini(tmp_path / "mini")
    params = [a for k, v in {**SMALL, "path": "mini"}.items() for a in ("--task-param", f"{k}={v}")]
    run = ["run", "--task", "mini-imagenet", *params, "--algorithms", "protonet", "--sources",
           "mlp", "--trials", "2", "--meta-steps", "2", "--eval-every", "2", "--no-progress"]
    result = autometa_cli(*run, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    (board,) = (tmp_path / "autometa-reports").glob("mini-imagenet-seed*[0-9].csv")
    frame = pd.read_csv(board)
    searched = frame[~frame["baseline"]]
    assert len(searched) == 2 and set(searched["algorithm"]) == {"protonet"}
    assert set(frame[frame["baseline"]]["source"]) == {"raw"}  # the baselines ran too
    assert frame["val_accuracy"].between(0, 1).all() and (frame["test_n"].dropna() > 0).any()

    (tmp_path / "mini" / "val.csv").unlink()
    before = (tmp_path / "autometa.db").read_bytes()
    refused = autometa_cli(*run, "--study", "other", cwd=tmp_path)
    assert refused.returncode == 2, refused.stderr
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("autometa: error: mini-imagenet: "), lines
    assert "val.csv' is missing" in lines[0]
    assert (tmp_path / "autometa.db").read_bytes() == before  # nothing stored


def test_plugins_lists_every_benchmark(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "autometa", "plugins"], cwd=tmp_path,
                            capture_output=True, text=True, env={**os.environ, "COLUMNS": "250"},
                            timeout=QUICK_SUBPROCESS)
    assert result.returncode == 0, result.stderr
    for name in ("mini-imagenet", "tiered-imagenet", "cifar-fs", "fc100", "cub", "omniglot"):
        assert f"task {name}" in result.stdout, name
