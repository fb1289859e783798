"""CIFAR-FS and FC100: few-shot splits of CIFAR-100's 100 classes (600 32x32 images each).

Both read CIFAR-100's python version as it unpacks: ``path/cifar-100-python/train``,
``test`` and ``meta`` (pickles: ``data``, (n, 3072) uint8, each row the R, G and B planes
of a 32x32 image; ``fine_labels`` and ``coarse_labels``; meta's ``fine_label_names`` and
``coarse_label_names``). Both pool the train and test images (500 + 100 per class), as the
papers do, and split the classes:

* **CIFAR-FS** (Bertinetto et al., Meta-learning with differentiable closed-form solvers,
  ICLR 2019): 64/16/20 classes from the split lists ``path/splits/bertinetto/{train,val,
  test}.txt`` (one fine class name per line, as in their release); without that folder,
  the published lists below.
* **FC100** (Oreshkin et al., TADAM, NeurIPS 2018): split by superclass, 12/4/4
  superclasses (60/20/20 classes), so that meta-test classes share no superclass with
  meta-train ones.

The pixels go into the store as an in-memory array keyed by the pickles' paths, sizes and
times; both tasks share one store (the same images in the same order). The pickles are
found before any is read, and read as plain data only (``pickles``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from autometa import DataError
from autometa.image_store import ArrayImages
from autometa_plugins.fewshot_datasets import pickles
from autometa_plugins.fewshot_datasets.benchmark import (
    BenchmarkTask,
    Layout,
    disjoint,
    file_facts,
    lookup,
    read_names,
    require,
)

log = logging.getLogger(__name__)

FOLDER = "cifar-100-python"
LISTS = "splits/bertinetto"
#: CIFAR-FS (Bertinetto et al. 2019), as their split lists name the classes. Transcribed
#: from torchmeta's copy of the lists (tristandeleu/pytorch-meta,
#: torchmeta/datasets/assets/cifar100/cifar-fs/{train,val,test}.json), whose 64/16/20
#: counts match the paper and learn2learn's description of its download.
CIFAR_FS = {
    "train": (
        "apple aquarium_fish bear bee bottle bowl boy bridge bus can castle caterpillar "
        "chair clock cloud cockroach couch cup dinosaur dolphin elephant forest girl hamster "
        "house kangaroo keyboard lawn_mower lion lizard lobster mountain mouse mushroom "
        "oak_tree orange orchid palm_tree pear pine_tree plate porcupine possum rabbit "
        "raccoon ray road seal shrew skunk skyscraper snake spider squirrel streetcar "
        "sunflower tank tiger train trout tulip turtle willow_tree wolf").split(),
    "val": (
        "beaver beetle butterfly camel cattle crab crocodile flatfish lamp maple_tree "
        "motorcycle otter sea shark television tractor").split(),
    "test": (
        "baby bed bicycle chimpanzee fox leopard man pickup_truck plain poppy rocket rose "
        "snail sweet_pepper table telephone wardrobe whale woman worm").split(),
}
#: FC100's superclass split (Oreshkin et al. 2018, TADAM's supplementary material and
#: code, github.com/ElementAI/TADAM): CIFAR-100 coarse labels 1-6, 9, 10, 15, 17-19 train,
#: 8, 11, 13, 16 validate, 0, 7, 12, 14 test; by name as in torchmeta's
#: torchmeta/datasets/assets/cifar100/fc100/{train,val,test}.json.
FC100_SUPERCLASSES = {
    "train": ("fish", "flowers", "food_containers", "fruit_and_vegetables",
              "household_electrical_devices", "household_furniture",
              "large_man-made_outdoor_things", "large_natural_outdoor_scenes", "reptiles",
              "trees", "vehicles_1", "vehicles_2"),
    "val": ("large_carnivores", "large_omnivores_and_herbivores", "non-insect_invertebrates",
            "small_mammals"),
    "test": ("aquatic_mammals", "insects", "medium_mammals", "people"),
}
SPLIT_NAMES = ("train", "val", "test")


@dataclass(frozen=True)
class Cifar100:
    """CIFAR-100's train and test images, pooled."""

    source: ArrayImages  # (60000, 32, 32, 3) RGB in the real data
    fine: np.ndarray  # (n,) int64 fine labels
    coarse: np.ndarray  # (n,) int64 coarse labels
    fine_names: list[str]
    coarse_names: list[str]


def read_cifar100(root: Path, name: str, hint: str,
                  check: Callable[[list[str], list[str]], None]) -> Cifar100:
    """CIFAR-100's python pickles under ``root``: all three found before any is read, and
    ``check(fine_names, coarse_names)`` called on meta's names before the images are read.

    Raises:
        DataError: a missing pickle, one without the expected keys, or arrays of the wrong
            shape or type; and what ``check`` raises.
    """
    files = [require(root, f"{FOLDER}/{part}", name, hint) for part in ("train", "test", "meta")]
    what = "CIFAR-100's python meta pickle"
    meta = pickles.entries(pickles.load(files[2], name, what),
                           ("fine_label_names", "coarse_label_names"), files[2], name, what)
    fine_names = [pickles.text(n) for n in meta["fine_label_names"]]
    coarse_names = [pickles.text(n) for n in meta["coarse_label_names"]]
    check(fine_names, coarse_names)
    pixels, fine, coarse = [], [], []
    for file in files[:2]:
        what = "CIFAR-100's python pickle"
        part = pickles.entries(pickles.load(file, name, what),
                               ("data", "fine_labels", "coarse_labels"), file, name, what)
        data = part["data"]
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
                or data.shape[1] != 3 * 32 * 32:
            got = (f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray)
                   else type(data).__name__)
            raise DataError(f"{name}: {str(file)!r}: 'data' is {got}, not uint8 (n, 3072) "
                            "rows of 32x32 R, G and B planes; use the published file")
        labels = [np.asarray(part[k], dtype=np.int64).reshape(-1)
                  for k in ("fine_labels", "coarse_labels")]
        for key, label, names in zip(("fine_labels", "coarse_labels"), labels,
                                     (fine_names, coarse_names), strict=True):
            if len(label) != len(data) or len(label) and (label.min() < 0
                                                          or label.max() >= len(names)):
                raise DataError(f"{name}: {str(file)!r}: '{key}' must hold one index in "
                                f"[0, {len(names)}) per image ({len(data)} images); it has "
                                f"{len(label)} values; use the published file")
        # (n, 3072): R, G, B planes of 32x32 -> (n, 32, 32, 3)
        pixels.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        fine.append(labels[0])
        coarse.append(labels[1])
    source = ArrayImages(np.ascontiguousarray(np.concatenate(pixels)),
                         facts={"cifar-100-python": file_facts(files)},
                         slot=str((root / FOLDER).resolve()))
    return Cifar100(source, np.concatenate(fine), np.concatenate(coarse), fine_names,
                    coarse_names)


class _Cifar100Task(BenchmarkTask):
    """A split of CIFAR-100's classes (CIFAR's defaults: 32 px, RGB)."""

    hint = f"CIFAR-100's python pickles path/{FOLDER}/{{train,test,meta}}"

    def __init__(
        self,
        *,
        path: str | os.PathLike[str] | None = None,  # the folder holding cifar-100-python/
        size: int = 32,  # images are resized to size x size (CIFAR's own 32)
        channels: int | str = 3,  # 3 (RGB), 1 (grayscale) or "auto"
        resize: str = "stretch",  # (CIFAR's images are square: no effect at any size)
        ways: int = 5,  # classes per episode
        shots: int = 1,  # support images per class
        queries: int = 15,  # query images per class
        val_episodes: int = 100,  # fixed meta-val episodes, on which trials are ranked
        test_episodes: int = 600,  # fixed meta-test episodes (the field reports 600)
        seed: int = 0,
        device: torch.device | str = "cpu",
        cache_dir: str | os.PathLike[str] | None = None,  # this machine's (--cache-dir)
    ) -> None:
        super().__init__(path=path, size=size, channels=channels, resize=resize, ways=ways,
                         shots=shots, queries=queries, val_episodes=val_episodes,
                         test_episodes=test_episodes, seed=seed, device=device,
                         cache_dir=cache_dir)


class CifarFS(_Cifar100Task):
    """CIFAR-FS: Bertinetto et al.'s 64/16/20 class split of CIFAR-100 (module docstring)."""

    name = "cifar-fs"
    hint = (f"CIFAR-100's python pickles path/{FOLDER}/{{train,test,meta}}, and optionally "
            f"the split lists path/{LISTS}/{{train,val,test}}.txt")

    def read(self, root: Path) -> Layout:
        lists = root / LISTS
        files = [require(root, f"{LISTS}/{s}.txt", self.name, self.hint) for s in SPLIT_NAMES] \
            if lists.exists() else []
        listed = [read_names(f, self.name) for f in files]
        splits: list[list[int]] = []

        def check(fine_names: list[str], _: list[str]) -> None:  # before the images are read
            known = {n: i for i, n in enumerate(fine_names)}
            if files:
                where = "CIFAR-100's meta (fine_label_names)"
                splits.extend(lookup(names, known, f, self.name, where)
                              for names, f in zip(listed, files, strict=True))
                return
            absent = [c for s in SPLIT_NAMES for c in CIFAR_FS[s] if c not in known]
            if absent:
                raise DataError(f"{self.name}: CIFAR-100's meta has no class {absent[0]!r} "
                                f"(of CIFAR-FS's published split; {len(absent)} missing); "
                                "use CIFAR-100's published pickles, or give split lists in "
                                f"path/{LISTS}/")
            splits.extend([known[c] for c in CIFAR_FS[s]] for s in SPLIT_NAMES)

        data = read_cifar100(root, self.name, self.hint, check)
        if files:
            split_from = (f"{LISTS}/train.txt", f"{LISTS}/val.txt", f"{LISTS}/test.txt")
        else:
            log.info("%s: no %s in %s; using Bertinetto et al.'s published split", self.name,
                     LISTS, root)
            split_from = ("published train", "published val", "published test")
        disjoint([[data.fine_names[c] for c in s] for s in splits], split_from, self.name)
        return Layout(data.source, data.fine, data.fine_names,
                      (splits[0], splits[1], splits[2]), split_from,
                      store="cifar-100", facts={"format": "CIFAR-100 python pickles"})


class FC100(_Cifar100Task):
    """FC100: Oreshkin et al.'s 12/4/4 superclass split of CIFAR-100 (module docstring)."""

    name = "fc100"

    def read(self, root: Path) -> Layout:
        def check(_: list[str], coarse_names: list[str]) -> None:  # before the images
            absent = [c for s in SPLIT_NAMES for c in FC100_SUPERCLASSES[s]
                      if c not in coarse_names]
            if absent:
                raise DataError(f"{self.name}: CIFAR-100's meta has no superclass "
                                f"{absent[0]!r} (coarse_label_names: "
                                f"{', '.join(coarse_names[:3])}, ...); FC100 splits "
                                "CIFAR-100's 20 superclasses; use the published pickles")

        data = read_cifar100(root, self.name, self.hint, check)
        coarse_ids = {n: i for i, n in enumerate(data.coarse_names)}
        splits = []
        for split in SPLIT_NAMES:  # the fine classes of the split's superclasses, sorted
            wanted = [coarse_ids[c] for c in FC100_SUPERCLASSES[split]]
            splits.append(np.unique(data.fine[np.isin(data.coarse, wanted)]).tolist())
        mixed = sorted(set(splits[0]) & set(splits[1] + splits[2]) | set(splits[1])
                       & set(splits[2]))
        if mixed:
            raise DataError(f"{self.name}: class {data.fine_names[mixed[0]]!r} has images in "
                            "superclasses of two FC100 splits; CIFAR-100 gives each class one "
                            "superclass: use the published pickles")
        return Layout(data.source, data.fine, data.fine_names,
                      (splits[0], splits[1], splits[2]),
                      ("superclasses " + ", ".join(FC100_SUPERCLASSES["train"]),
                       "superclasses " + ", ".join(FC100_SUPERCLASSES["val"]),
                       "superclasses " + ", ".join(FC100_SUPERCLASSES["test"])),
                      store="cifar-100", facts={"format": "CIFAR-100 python pickles"})
