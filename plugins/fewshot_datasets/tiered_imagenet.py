"""tieredImageNet (Ren et al., Meta-learning for semi-supervised few-shot classification,
ICLR 2018): 351 meta-train, 97 meta-val and 160 meta-test classes, split by ImageNet's
high-level categories (20/6/8), so meta-test classes are far from meta-train ones.

Two published on-disk forms are read (the first found wins):

* **Ren et al.'s pickles**, as their release unpacks: for each split ``train``, ``val``
  and ``test``, ``path/<split>_images_png.pkl`` (a list of PNG-encoded 84x84 images, one
  uint8 array of file bytes each) and ``path/<split>_labels.pkl`` (a dict with
  ``label_specific``, each image's class index within the split, and
  ``label_specific_str``, the class names). The PNG bytes are decoded into the store like
  files (:class:`PngImages`); the pickles are read as plain data only (``pickles``).
* **class folders**: ``path/{train,val,test}/<wnid>/<image>``, the form most re-releases
  and conversion scripts write (one folder per WordNet id).

Each split is the one published; a class's id is its place in its split (the pickles'
order, or the sorted folder names).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from autometa import DataError
from autometa.image_store import FileImages
from autometa.images import decode_image, open_image
from autometa_plugins.fewshot_datasets import pickles
from autometa_plugins.fewshot_datasets.benchmark import (
    BenchmarkTask,
    Layout,
    disjoint,
    file_facts,
    one_after_another,
    require,
)
from autometa_plugins.fewshot_datasets.folders import class_folders

NAME = "tiered-imagenet"
SPLIT_NAMES = ("train", "val", "test")
HINT = ("path/{train,val,test}/<wnid>/<image> (class folders), or Ren et al.'s pickles "
        "path/{train,val,test}_images_png.pkl with path/{train,val,test}_labels.pkl")
LABEL_KEYS = ("label_specific", "label_specific_str")


class TieredImageNet(BenchmarkTask):
    """tieredImageNet few-shot episodes over Ren et al.'s split (module docstring)."""

    name = NAME
    hint = HINT

    def read(self, root: Path) -> Layout:
        if any((root / f"{s}_{kind}.pkl").exists() for s in SPLIT_NAMES
               for kind in ("images_png", "labels")):
            return _read_pickles(root)
        return _read_folders(root)


def _read_folders(root: Path) -> Layout:
    dirs = [require(root, split, NAME, HINT, folder=True) for split in SPLIT_NAMES]
    found = [class_folders(d, NAME, HINT) for d in dirs]
    wnids = [[cls for cls, _ in split] for split in found]
    disjoint(wnids, [f"{s}/" for s in SPLIT_NAMES], NAME)
    class_names, splits = one_after_another(wnids)
    files = [f for split in found for _, images in split for f in images]
    labels = np.repeat(np.arange(len(class_names)),
                       [len(images) for split in found for _, images in split])
    return Layout(FileImages(files, slot=str(root.resolve())), labels.astype(np.int64),
                  class_names, splits, ("train/", "val/", "test/"), store=NAME,
                  facts={"format": "class folders"})


def _read_pickles(root: Path) -> Layout:
    image_files = [require(root, f"{s}_images_png.pkl", NAME, HINT) for s in SPLIT_NAMES]
    label_files = [require(root, f"{s}_labels.pkl", NAME, HINT) for s in SPLIT_NAMES]
    names: list[list[str]] = []
    labels: list[np.ndarray] = []
    for file in label_files:  # the small files first: a wrong one fails in a moment
        what = "tieredImageNet's labels pickle"
        entry = pickles.entries(pickles.load(file, NAME, what), LABEL_KEYS, file, NAME, what)
        split_names = [pickles.text(n) for n in entry["label_specific_str"]]
        label = np.asarray(entry["label_specific"])
        if label.ndim != 1 or label.dtype.kind not in "iu" or len(label) and (
                label.min() < 0 or label.max() >= len(split_names)):
            raise DataError(f"{NAME}: {str(file)!r}: label_specific must be one class index "
                            f"in [0, {len(split_names)}) per image (label_specific_str has "
                            f"{len(split_names)} names); use the published file")
        names.append(split_names)
        labels.append(label.astype(np.int64))
    blobs: list[Any] = []
    for file, label in zip(image_files, labels, strict=True):
        images = pickles.load(file, NAME, "tieredImageNet's PNG images pickle")
        if not isinstance(images, (list, tuple, np.ndarray)) or len(images) != len(label):
            count = len(images) if isinstance(images, (list, tuple, np.ndarray)) else "no"
            raise DataError(f"{NAME}: {str(file)!r} holds {count} image(s), but its labels "
                            f"pickle labels {len(label)}; the two files must be of one "
                            "release")
        blobs.extend(images)
    class_names, splits = one_after_another(names)
    offsets = np.cumsum([0, *map(len, names)])[:-1]
    all_labels = np.concatenate([label + offset for label, offset in zip(labels, offsets,
                                                                           strict=True)])
    source = PngImages(blobs, files=[*image_files, *label_files], slot=str(root.resolve()))
    return Layout(source, all_labels, class_names, splits,
                  ("train_labels.pkl", "val_labels.pkl", "test_labels.pkl"), store=NAME,
                  facts={"format": "Ren et al.'s PNG pickles"})


class PngImages:
    """Encoded images held in memory (Ren et al.'s pickles: one array of PNG file bytes
    per image), decoded like files; keyed by the pickle files' paths, sizes and times."""

    def __init__(self, blobs: Sequence[Any], *, files: Sequence[Path], slot: str) -> None:
        self.blobs, self.files, self._slot = blobs, list(files), slot

    def __len__(self) -> int:
        return len(self.blobs)

    def key(self) -> dict[str, Any]:
        return {"png-pickles": file_facts(self.files), "images": len(self.blobs)}

    def slot(self) -> str:
        return self._slot

    def decode(self, i: int, size: int, channels: int | str,
               resize: str) -> tuple[np.ndarray, bool]:
        try:
            data = np.asarray(self.blobs[i], dtype=np.uint8).tobytes()
            with open_image(io.BytesIO(data), f"image {i} of the PNG pickles in "
                            f"{self._slot!r}") as opened:
                square = opened.size[0] == opened.size[1]
                return decode_image(opened, size=size, channels=channels, resize=resize), square
        except DataError:
            raise
        except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError, ...
            brief = (str(exc).splitlines() or ["no details"])[0][:120]
            raise DataError(f"image {i} of the PNG pickles in {self._slot!r} cannot be decoded "
                            f"({type(exc).__name__}: {brief}); the pickle is damaged: "
                            "download it again") from exc
