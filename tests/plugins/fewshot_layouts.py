"""Tiny datasets in the field's published layouts, for tests/plugins/test_fewshot_datasets.py
(see its docstring): one grey level (or red level, for CIFAR) per class."""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np
import torch
from PIL import Image

SPLITS = ("meta-train", "meta-val", "meta-test")


# -- drawing: one grey level per class -------------------------------------------------------
def shade(k: int) -> int:
    return 20 + 9 * k


def image(k: int, mode: str = "L", index: int = 0) -> Image.Image:
    """Class ``k``'s grey level, with a corner of the image's own (so that two images of
    one class differ)."""
    grey = Image.new(mode, (12, 12), shade(k) if mode == "L" else (shade(k),) * 3)
    grey.paste(255 - 40 * index if mode == "L" else (255 - 40 * index,) * 3, (0, 0, 3, 3))
    return grey


def class_of(pixels: torch.Tensor, names: list[str]) -> str:
    """The class whose grey level an image (C, H, W in [0, 1]) shows (its median: the
    corner is the image's own)."""
    return names[round((float(pixels[0].median()) * 255 - 20) / 9)]


def shown(task, episodes, names: list[str]) -> set[str]:
    """The classes of every image of ``episodes``, and a check that each episode label
    stands for one class."""
    seen = set()
    for x, y in ((episodes.support_x, episodes.support_y), (episodes.query_x, episodes.query_y)):
        for task_x, task_y in zip(x, y, strict=True):
            by_label: dict[int, set[str]] = {}
            for pixels, label in zip(task_x, task_y.tolist(), strict=True):
                by_label.setdefault(label, set()).add(class_of(pixels, names))
            assert all(len(c) == 1 for c in by_label.values()), by_label
            seen |= {c for cs in by_label.values() for c in cs}
    return seen


def check_splits(task, expected: dict[str, list[str]], names: list[str]) -> None:
    """The published split is the task's, and each split's episodes show only its classes."""
    facts = task.describe()
    assert facts["classes_by_split"] == expected
    assert facts["class_split"] == {s: len(c) for s, c in expected.items()}
    generator = torch.Generator().manual_seed(0)
    for split, episodes in zip(SPLITS, (task.sample(6, generator), task.meta_val(),
                                        task.meta_test()), strict=True):
        assert shown(task, episodes, names) <= set(expected[split]), split


# -- the published layouts, written small ------------------------------------------------------
MINI = {"train.csv": ["n03000001", "n01000002", "n02000003"], "val.csv": ["n09000000", "n01500000"],
        "test.csv": ["n05000000", "n00000001"]}


def write_mini(root: Path, per_class: int = 3) -> list[str]:
    """Ravi & Larochelle's layout; returns the class names in shade order."""
    (root / "images").mkdir(parents=True)
    names = [w for wnids in MINI.values() for w in wnids]
    for csv_name, wnids in MINI.items():
        rows = ["filename,label"]
        for wnid in wnids:
            for i in range(per_class):
                filename = f"{wnid}{i + 1:08d}.jpg"
                image(names.index(wnid), "RGB", i).save(root / "images" / filename)
                rows.append(f"{filename},{wnid}")
        (root / csv_name).write_text("\n".join(rows) + "\n")
    return names


TIERED = {"train": ["n04000001", "n02000002", "n03000003"], "val": ["n01000004", "n06000005"],
          "test": ["n05000006", "n00000007"]}


def write_tiered_folders(root: Path) -> list[str]:
    names = [w for wnids in TIERED.values() for w in wnids]
    for split, wnids in TIERED.items():
        for wnid in wnids:
            (root / split / wnid).mkdir(parents=True)
            for i in range(3):
                image(names.index(wnid), "RGB", i).save(root / split / wnid / f"{wnid}_{i}.JPEG")
    return names


def png_bytes(k: int, index: int = 0) -> np.ndarray:
    """One image as cv2.imencode gives it: PNG file bytes, uint8 (bytes, 1)."""
    buffer = io.BytesIO()
    image(k, "RGB", index).save(buffer, format="PNG")
    return np.frombuffer(buffer.getvalue(), dtype=np.uint8).reshape(-1, 1)


def py2_pickle(data: object) -> bytes:
    """``data`` pickled as Python 2 with numpy 1 wrote the published files: protocol 2,
    numpy's arrays rebuilt by ``numpy.core.multiarray._reconstruct``."""
    return pickle.dumps(data, protocol=2).replace(b"numpy._core.", b"numpy.core.")


def write_tiered_pickles(root: Path) -> list[str]:
    """Ren et al.'s pickles as Python 2 wrote them (bytes keys and names, protocol 2)."""
    root.mkdir(parents=True)
    names = [w for wnids in TIERED.values() for w in wnids]
    for split, wnids in TIERED.items():
        order = [w for w in wnids for _ in range(3)][::-1]  # images need not be grouped
        labels = {b"label_specific": np.array([wnids.index(w) for w in order], dtype=np.int32),
                  b"label_general": np.zeros(len(order), dtype=np.int32),
                  b"label_specific_str": [w.encode() for w in wnids],
                  b"label_general_str": [b"category"]}
        (root / f"{split}_labels.pkl").write_bytes(py2_pickle(labels))
        (root / f"{split}_images_png.pkl").write_bytes(
            py2_pickle([png_bytes(names.index(w), i) for i, w in enumerate(order)]))
    return names


#: CIFAR-100's superclasses and their classes (CIFAR's own page), alphabetical as in meta.
CIFAR100 = {
    "aquatic_mammals": "beaver dolphin otter seal whale",
    "fish": "aquarium_fish flatfish ray shark trout",
    "flowers": "orchid poppy rose sunflower tulip",
    "food_containers": "bottle bowl can cup plate",
    "fruit_and_vegetables": "apple mushroom orange pear sweet_pepper",
    "household_electrical_devices": "clock keyboard lamp telephone television",
    "household_furniture": "bed chair couch table wardrobe",
    "insects": "bee beetle butterfly caterpillar cockroach",
    "large_carnivores": "bear leopard lion tiger wolf",
    "large_man-made_outdoor_things": "bridge castle house road skyscraper",
    "large_natural_outdoor_scenes": "cloud forest mountain plain sea",
    "large_omnivores_and_herbivores": "camel cattle chimpanzee elephant kangaroo",
    "medium_mammals": "fox porcupine possum raccoon skunk",
    "non-insect_invertebrates": "crab lobster snail spider worm",
    "people": "baby boy girl man woman",
    "reptiles": "crocodile dinosaur lizard snake turtle",
    "small_mammals": "hamster mouse rabbit shrew squirrel",
    "trees": "maple_tree oak_tree palm_tree pine_tree willow_tree",
    "vehicles_1": "bicycle bus motorcycle pickup_truck train",
    "vehicles_2": "lawn_mower rocket streetcar tank tractor",
}
FINE = sorted(c for classes in CIFAR100.values() for c in classes.split())
COARSE = sorted(CIFAR100)
SUPERCLASS = {c: s for s, classes in CIFAR100.items() for c in classes.split()}


def write_cifar(root: Path, per_class: tuple[int, int] = (2, 1), drop: str = "") -> Path:
    """CIFAR-100's python pickles: 2 train and 1 test image per class, red level = class."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    for part, count in zip(("train", "test"), per_class, strict=True):
        fine = [k for k in range(100) for _ in range(count)]
        planes = np.zeros((len(fine), 3, 32, 32), dtype=np.uint8)
        planes[:, 0] = np.array(fine, dtype=np.uint8)[:, None, None] * 2 + 20  # R: the class
        planes[:, 1, :16] = 200  # G: top half, so planes must not be mixed up
        planes[:, 2, 0, 0] = np.arange(len(fine)) % 256  # B: one pixel of the image's own
        entry = {b"batch_label": part.encode(), b"filenames": [b"x.png"] * len(fine),
                 b"data": planes.reshape(len(fine), 3072), b"fine_labels": fine,
                 b"coarse_labels": [COARSE.index(SUPERCLASS[FINE[k]]) for k in fine]}
        entry.pop(drop.encode(), None)
        (folder / part).write_bytes(py2_pickle(entry))
    meta = {b"fine_label_names": [n.encode() for n in FINE],
            b"coarse_label_names": [n.encode() for n in COARSE]}
    (folder / "meta").write_bytes(py2_pickle(meta))
    return root


def cifar_class(pixels: torch.Tensor) -> str:
    return FINE[round((float(pixels[0].median()) * 255 - 20) / 2)]


CUB_CLASSES = [f"{i:03d}.Bird_{name}" for i, name in
               enumerate(["Albatross", "Auklet", "Blackbird", "Bobolink", "Bunting", "Catbird",
                          "Cowbird", "Crow"], 1)]


def write_cub(root: Path, per_class: int = 3) -> list[str]:
    """CUB-200-2011's lists and images/<class folder>/<file>.jpg; classes.txt unsorted."""
    order = CUB_CLASSES[::-1]  # ids need not follow the names' order
    images, labels = [], []
    for class_id, folder in enumerate(order, 1):
        (root / "images" / folder).mkdir(parents=True)
        for i in range(per_class):
            relative = f"{folder}/{folder.split('.')[1]}_{i:04d}.jpg"
            image(CUB_CLASSES.index(folder), "RGB", i).save(root / "images" / relative)
            images.append(f"{len(images) + 1} {relative}")
            labels.append(f"{len(labels) + 1} {class_id}")
    (root / "classes.txt").write_text("".join(f"{i} {c}\n" for i, c in enumerate(order, 1)))
    (root / "images.txt").write_text("\n".join(images) + "\n")
    (root / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    return CUB_CLASSES


def write_omniglot(root: Path) -> list[str]:
    names = []
    for folder, alphabets in (("images_background", ["Bengali", "Greek", "Latin", "Tifinagh"]),
                              ("images_evaluation", ["Atlantean", "Oriya"])):
        for alphabet in alphabets:
            for c in (1, 2):
                names.append(f"{alphabet}/character{c:02d}")
                (root / folder / alphabet / f"character{c:02d}").mkdir(parents=True)
                for i in range(3):
                    image(len(names) - 1, "L", i).save(
                        root / folder / alphabet / f"character{c:02d}" / f"{i:04d}_{i}.png")
    return names
