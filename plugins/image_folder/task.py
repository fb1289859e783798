"""A local directory of images as a task: few-shot episodes, or a split of your own images.

``path`` is one folder per class (``root/<class>/<image>``) or the Omniglot layout
(``root/<alphabet>/<character>/<image>``, a class is a character); see
:mod:`autometa_plugins.image_folder.loader` for the detection rule. Images are decoded
once per machine into a shared uint8 store in the cache directory
(:mod:`autometa.image_store`: every worker maps the same file, later runs reuse it);
episodes are indices into it, and a trial gathers just its episodes' images, as float in
[0, 1] on its device. ``resize`` says what happens to images that are not square
(``stretch``, ``center-crop``, ``pad``: :mod:`autometa.images`).

* ``episodes="few-shot"`` (default): N-way K-shot episodes over a seeded, disjoint split
  of the classes into meta-train / meta-val / meta-test (``val_fraction`` and
  ``test_fraction`` of the classes, at least one each; the rest trains). For the
  Omniglot layout, ``split_by="alphabet"`` splits whole alphabets instead (as Omniglot's
  background/evaluation split does), so no alphabet is seen in training and evaluation.
* ``episodes="split"``: transfer to your own dataset ("airplane" vs "not-airplane"
  folders): a seeded train/val/test split of every class's images (``val_fraction`` and
  ``test_fraction`` of each class); one label per class folder, in sorted order.

Fractions: ``val_fraction`` and ``test_fraction`` each in [0.05, 0.5], their sum below 0.9;
every part gets at least one class (few-shot: rounded, at least ``ways``) or one image of
each class (split). Your own split replaces them (:mod:`autometa_plugins.image_folder.
splits`): ``split_file`` (a CSV ``name,split`` of classes, or of images with
``episodes="split"``), or ``test_path`` (a folder of test images, ``episodes="split"``).

One class serves both modes (the engine reads one ``params`` and one signature): it
delegates to an inner :class:`~autometa.datasets.FewShotTask` or
:class:`~autometa.datasets.TargetTask`. Every check that needs only file counts runs
before any image is decoded, so a wrong setting fails fast on a large folder.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor

from autometa import Categorical, ConfigError, DataError, Int
from autometa.datasets import (
    FEW_SHOT_PARAMS,
    TARGET_PARAMS,
    AugmentedImages,
    FewShotTask,
    InnerTask,
    TargetTask,
    split_classes,
)
from autometa.episodes import ClassPool
from autometa.image_store import FileImages, StoredImages, open_store
from autometa.images import RESIZE_POLICIES
from autometa.space import SearchSpace
from autometa.task import InputBatch
from autometa_plugins.image_folder.inputs import read_images
from autometa_plugins.image_folder.loader import (
    LAYOUTS,
    NAME,
    OMNIGLOT_HINT,
    ClassFolder,
    Folder,
    scan,
)
from autometa_plugins.image_folder.splits import read_split_file, train_val

SPLITS = ("meta-train", "meta-val", "meta-test")


class _TargetSplit(TargetTask):
    kind = "classification"


class ImageFolder(AugmentedImages, InnerTask):
    """Classification on a local image directory (see the module docstring)."""

    kind = "classification"
    params: ClassVar[SearchSpace] = {
        **FEW_SHOT_PARAMS,
        **TARGET_PARAMS,
        "layout": Categorical(LAYOUTS),
        "episodes": Categorical(("few-shot", "split")),
        "split_by": Categorical(("class", "alphabet")),
        "size": Int(4, 512),
        "channels": Categorical(("auto", 1, 3)),
        "resize": Categorical(RESIZE_POLICIES),
    }

    def __init__(
        self,
        *,
        path: str | os.PathLike[str] | None = None,  # the image directory (required)
        layout: str = "auto",  # "auto", "classes" (root/<class>/) or "omniglot"
        episodes: str = "few-shot",  # "few-shot": class split; "split": split the images
        split_by: str = "class",  # few-shot: split classes, or "alphabet"s (Omniglot)
        size: int = 28,  # images are resized to size x size
        channels: int | str = "auto",  # 1 (grayscale), 3 (RGB), or "auto": 1 if all gray
        resize: str = "stretch",  # non-square images: "stretch", "center-crop" or "pad"
        ways: int = 5,  # few-shot: classes per episode
        shots: int = 1,  # support images per class (few-shot and split meta-train episodes)
        queries: int = 5,  # query images per class
        val_fraction: float = 0.2,  # of the classes (few-shot) or of each class's images
        test_fraction: float = 0.2,  # likewise, for meta-test
        val_episodes: int = 100,  # few-shot: fixed meta-val episodes
        test_episodes: int = 400,  # few-shot: fixed meta-test episodes
        seed: int = 0,
        device: torch.device | str = "cpu",
        split_file: str | os.PathLike[str] | None = None,  # CSV name,split: your own split
        test_path: str | os.PathLike[str] | None = None,  # split: a folder of test images
        cache_dir: str | os.PathLike[str] | None = None,  # this machine's (--cache-dir)
    ) -> None:
        super().__init__(seed=seed, device=device)
        for key, value in {"layout": layout, "episodes": episodes, "split_by": split_by,
                           "channels": channels, "resize": resize}.items():
            choices = self.params[key].choices  # type: ignore[union-attr]
            if value not in choices or isinstance(value, bool):
                raise ConfigError(f"{NAME}: {key}={value!r} is not one of {list(choices)}")
        if path is None:
            raise ConfigError(f"{NAME}: give the image folder, e.g. --task-param path=data/pets "
                              "(or task_params={'path': ...}); it holds one folder per class")
        if val_fraction + test_fraction >= 0.9:
            raise ConfigError(f"{NAME}: val_fraction + test_fraction = "
                              f"{val_fraction + test_fraction:g} leaves too little to train "
                              "on; keep the sum below 0.9")
        if test_path is not None and episodes != "split":
            raise ConfigError(f"{NAME}: test_path holds test images for episodes='split'; "
                              "with few-shot episodes give a split_file of classes instead")
        if split_file is not None and test_path is not None:
            raise ConfigError(f"{NAME}: split_file and test_path both set the test split; "
                              "give one of them")
        if split_file is not None and split_by == "alphabet":
            raise ConfigError(f"{NAME}: split_file lists the classes of each split itself; "
                              "leave split_by at 'class'")
        root = _path(path)
        self.split_file = None if split_file is None else _path(split_file)
        self.test_path = None if test_path is None else _path(test_path)
        folder = scan(root, layout)
        if split_by == "alphabet" and (episodes != "few-shot" or folder.layout != "omniglot"):
            why = ("episodes='split' splits images, not classes" if episodes != "few-shot" else
                   f"{str(folder.root)!r} has one folder per class, not {OMNIGLOT_HINT}")
            raise ConfigError(f"{NAME}: split_by='alphabet' needs few-shot episodes on the "
                              f"Omniglot layout, but {why}; use split_by='class'")
        self.folder, self.size, self.resize = folder, size, resize
        self.cache_dir = cache_dir
        self.episodes, self.split_by = episodes, split_by
        self.class_names = [c.name for c in folder.classes]
        labels = torch.repeat_interleave(torch.arange(len(folder)),
                                         torch.tensor([len(c.files) for c in folder.classes]))
        self.labels = labels  # (n,): each image's class, in class order and file order
        inner: FewShotTask | TargetTask
        if episodes == "few-shot":
            inner = self._few_shot(labels, ways=ways, shots=shots, queries=queries,
                                         val_fraction=val_fraction, test_fraction=test_fraction,
                                         val_episodes=val_episodes, test_episodes=test_episodes,
                                         channels=channels)
        else:
            inner = self._split(labels, shots=shots, queries=queries,
                                      val_fraction=val_fraction, test_fraction=test_fraction,
                                      channels=channels)
        self.use(inner)
        # The file paths only key and build the store: dropped now, so that a worker holds
        # no Path per image (779,165 of them took ~330 MB at tiered-ImageNet's size).
        self.image_count = sum(len(c.files) for c in folder.classes)
        self.folder = Folder(folder.root, folder.layout,
                             [ClassFolder(c.name, c.group, ()) for c in folder.classes])

    # -- building ------------------------------------------------------------------------
    def _few_shot(self, labels: Tensor, *, ways: int, shots: int, queries: int,
                  val_fraction: float, test_fraction: float, val_episodes: int,
                  test_episodes: int, channels: int | str) -> FewShotTask:
        _check_counts(self.folder.classes, shots + queries, "shots + queries",
                      "lower 'shots' or 'queries'")
        if self.split_file is not None:
            self.class_split = read_split_file(self.split_file, self.class_names, "class")
        else:
            self.class_split = _class_split(self.folder, self.split_by, val_fraction,
                                            test_fraction, self.seed)
        got = [len(s) for s in self.class_split]
        if min(got) < ways:
            per = ", ".join(f"{n} {g}" for n, g in zip(SPLITS, got, strict=True))
            raise DataError(
                f"{NAME}: {ways}-way episodes need {ways} classes in every split; the split "
                f"by {self.split_by} of the {len(self.folder)} classes gave {per} "
                f"(val_fraction={val_fraction:g}, test_fraction={test_fraction:g}); lower "
                "'ways', change the fractions, or add classes")
        task = FewShotTask(ways=ways, shots=shots, queries=queries, val_episodes=val_episodes,
                           test_episodes=test_episodes, seed=self.seed, device=self.device)
        x = self._decode(self._files(), channels)
        task.input_shape = self.input_shape
        task.set_pools(*(ClassPool(x, labels, classes, name=f"{NAME} {split}")
                         for split, classes in zip(SPLITS, self.class_split, strict=True)))
        return task

    def _split(self, labels: Tensor, *, shots: int, queries: int, val_fraction: float,
               test_fraction: float, channels: int | str) -> TargetTask:
        if len(self.folder) < 2:
            raise DataError(
                f"{NAME}: episodes='split' needs at least 2 class folders to tell apart; "
                f"{str(self.folder.root)!r} has 1 ({self.class_names[0]!r}); add a folder of "
                f"other images (e.g. 'not-{self.class_names[0]}')")
        _check_counts(self.folder.classes, 3, "the 3 a train/val/test split needs",
                      "add images")
        task = _TargetSplit(shots=shots, queries=queries, val_fraction=val_fraction,
                            test_fraction=test_fraction, seed=self.seed, device=self.device)
        files = self._files()
        split: tuple[Tensor, Tensor, Tensor]
        if self.split_file is not None:
            names = [f.relative_to(self.folder.root).as_posix() for f in files]
            split = tuple(torch.tensor(p) for p in  # type: ignore[assignment]
                          read_split_file(self.split_file, names, "image"))
        elif self.test_path is not None:
            test_files, test_labels = self._test_images()
            train, val = train_val(labels, val_fraction, self.seed)
            split = (train, val, torch.arange(len(files), len(files) + len(test_files)))
            files, labels = files + test_files, torch.cat([labels, test_labels])
            self.labels = labels
        else:
            split = task.split(labels, name=NAME)
        in_train = torch.bincount(labels[split[0]], minlength=len(self.folder)).tolist()
        need = shots + queries
        short = [(n, c.name) for n, c in zip(in_train, self.folder.classes, strict=True)
                 if n < need]
        if short:
            n, name = min(short)
            raise DataError(
                f"{NAME}: class {name!r} has {n} image(s) in the train split, fewer than shots "
                f"+ queries = {need} for meta-train episodes; lower 'shots' or 'queries' (or "
                "the val/test fractions), or add images")
        x = self._decode(files, channels)
        task.set_data(x, labels, split, name=NAME, class_names=self.class_names)
        return task

    def _files(self) -> list[Path]:
        """Every image of the folder, in class order and file order."""
        return [f for c in self.folder.classes for f in c.files]

    def _test_images(self) -> tuple[list[Path], Tensor]:
        """The images of ``test_path`` and their classes (those of ``path``).

        Raises:
            DataError: a class folder that ``path`` does not have.
        """
        assert self.test_path is not None
        test = scan(self.test_path, "classes")
        index = {name: i for i, name in enumerate(self.class_names)}
        unknown = [c.name for c in test.classes if c.name not in index]
        if unknown:
            more = f" and {len(unknown) - 1} more" if len(unknown) > 1 else ""
            raise DataError(f"{NAME}: test_path {str(self.test_path)!r} has class folder "
                            f"{unknown[0]!r}{more} that path {str(self.folder.root)!r} does "
                            f"not have; its class folders must be among the "
                            f"{len(self.class_names)} of path ({_some(self.class_names)})")
        files = [f for c in test.classes for f in c.files]
        labels = torch.tensor([index[c.name] for c in test.classes for _ in c.files])
        return files, labels

    def _decode(self, files: list[Path], channels: int | str) -> StoredImages:
        """``files`` from their store (built now if this machine has none for these files
        and settings)."""
        slot = [str(self.folder.root.resolve())] + (
            [] if self.test_path is None else [str(self.test_path.resolve())])
        source = FileImages(files, slot="|".join(slot))
        store = open_store(source, name=NAME, size=self.size, channels=channels,
                           resize=self.resize, cache_dir=self.cache_dir)
        self.input_shape = tuple(store.shape[1:])
        self.images = StoredImages(store, self.device)  # (n, C, size, size), gathered
        return self.images

    def read_inputs(self, path: Path, *, labelled: bool) -> InputBatch:
        """Image files, or a folder of them, decoded as this task's images
        (:mod:`autometa_plugins.image_folder.inputs`)."""
        return read_images(self, path, labelled=labelled)

    def describe(self) -> dict[str, Any]:
        facts = {
            **super().describe(),
            "path": str(self.folder.root.resolve()),
            "layout": self.folder.layout,
            "episodes": self.episodes,
            "classes": len(self.folder),
            "images": self.image_count,
            "split": ("split file" if self.split_file is not None else "test folder"
                      if self.test_path is not None else "fractions"),
        }
        if self.episodes == "few-shot":
            facts["split_by"] = self.split_by
            facts["class_split"] = dict(zip(SPLITS, map(len, self.class_split), strict=True))
            facts["classes_by_split"] = {
                split: [self.class_names[i] for i in classes]
                for split, classes in zip(SPLITS, self.class_split, strict=True)}
        return facts


def _some(names: list[str], shown: int = 5) -> str:
    """``'a', 'b', ... and N more``."""
    listed = ", ".join(map(repr, names[:shown]))
    return listed + (f" and {len(names) - shown} more" if len(names) > shown else "")


def _path(value: str | os.PathLike[str]) -> Path:
    return Path(os.fspath(value)) if isinstance(value, os.PathLike) else Path(str(value))


def _check_counts(classes: list[ClassFolder], need: int, what: str, fix: str) -> None:
    """Raise DataError naming the smallest class folder with fewer than ``need`` images."""
    short = [c for c in classes if len(c.files) < need]
    if short:
        worst = min(short, key=lambda c: len(c.files))
        others = f" (and {len(short) - 1} other class(es))" if len(short) > 1 else ""
        raise DataError(f"{NAME}: class {worst.name!r} has {len(worst.files)} image(s), fewer "
                        f"than {what} = {need}{others}; {fix}, or add images to it")


def _class_split(folder: Folder, split_by: str, val_fraction: float, test_fraction: float,
                 seed: int) -> list[list[int]]:
    """Class indices of meta-train, meta-val and meta-test: a seeded split of the classes,
    or of the alphabets (every class of an alphabet goes with it)."""
    units: list[Any] = folder.groups if split_by == "alphabet" else list(range(len(folder)))
    noun = "alphabets" if split_by == "alphabet" else "classes"
    n = len(units)
    if n < 3:
        listed = f" ({', '.join(map(repr, units))})" if split_by == "alphabet" else ""
        fix = "use split_by='class' or add alphabets" if split_by == "alphabet" else \
            "add class folders"
        raise DataError(f"{NAME}: a split by {split_by} needs at least 3 {noun} (one each for "
                        f"meta-train, meta-val and meta-test); {str(folder.root)!r} has "
                        f"{n}{listed}; {fix}")
    n_val, n_test = (max(1, math.floor(f * n + 0.5)) for f in (val_fraction, test_fraction))
    if n - n_val - n_test < 1:
        raise DataError(f"{NAME}: val_fraction={val_fraction:g} and test_fraction="
                        f"{test_fraction:g} of the {n} {noun} leave none for meta-train; "
                        f"lower the fractions or add {noun}")
    # split_classes draws on the CPU from the seed: the same split on every device.
    parts = split_classes(units, [n - n_val - n_test, n_val, n_test], seed, name=NAME)
    if split_by == "class":
        return [sorted(p) for p in parts]
    return [[i for i, c in enumerate(folder.classes) if c.group in set(p)] for p in parts]
