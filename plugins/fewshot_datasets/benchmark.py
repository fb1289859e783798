"""What every benchmark dataset shares: a *layout* read from the published files, checked,
decoded once into the shared store, and served as few-shot episodes over its published
split.

A reader (one module per format) turns a folder into a :class:`Layout`: an image source in
a fixed order, each image's class id, the class names, and the class ids of meta-train,
meta-val and meta-test exactly as published. :class:`BenchmarkTask` then

1. checks the episode sizes against the layout by class *name* (enough classes in every
   split for ``ways``, enough images in every class for ``shots + queries``): every check
   that needs only file names and counts runs before any image is decoded;
2. opens the decoded-image store (:func:`autometa.image_store.open_store`: built once per
   machine in the cache directory, reused by every later run and worker);
3. draws the fixed meta-val and meta-test episodes as indices into it.

The readers also share the small helpers below: the root check, required files named with
the layout they belong to, split lists, and "name the first, count the rest" for lists of
problems. Every error is one line starting with the task's name.
"""

from __future__ import annotations

import os
from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from autometa import Categorical, ConfigError, DataError, Int
from autometa.datasets import FEW_SHOT_PARAMS, AugmentedImages, FewShotTask
from autometa.episodes import ClassPool
from autometa.image_store import ImageSource, StoredImages, open_store
from autometa.images import RESIZE_POLICIES
from autometa.space import SearchSpace
from autometa.task import InputBatch
from autometa_plugins.fewshot_datasets.inputs import read_images

SPLITS = ("meta-train", "meta-val", "meta-test")


@dataclass(frozen=True)
class Layout:
    """A dataset as its published files describe it, before any image is decoded."""

    source: ImageSource  # every image of the three splits, in a fixed order
    labels: np.ndarray  # (n,) int64: each image's class id, an index into class_names
    class_names: list[str]  # "n01532829", "aquarium_fish", "Greek/character01", ...
    splits: tuple[list[int], list[int], list[int]]  # class ids: meta-train, -val, -test
    split_from: tuple[str, str, str]  # where each split is listed, for messages ("val.csv")
    store: str  # the decoded store's name (CIFAR-FS and FC100 share one CIFAR-100 store)
    facts: dict[str, Any] = field(default_factory=dict)  # more for describe(): the format


class BenchmarkTask(AugmentedImages, FewShotTask):
    """N-way K-shot episodes over a benchmark's published class split.

    Subclasses set :attr:`name` and :attr:`hint` and implement :meth:`read`; those whose
    defaults differ (CIFAR's 32 px, Omniglot's 28 px grayscale) restate ``__init__``.
    """

    name: ClassVar[str]  # the registered name, first in every message
    hint: ClassVar[str]  # the expected layout, in messages: "path/train.csv, ..."

    params: ClassVar[SearchSpace] = {
        **FEW_SHOT_PARAMS,
        "size": Int(4, 512),
        "channels": Categorical(("auto", 1, 3)),
        "resize": Categorical(RESIZE_POLICIES),
    }

    def __init__(
        self,
        *,
        path: str | os.PathLike[str] | None = None,  # the dataset's folder (required)
        size: int = 84,  # images are resized to size x size (84: the field's protocol)
        channels: int | str = 3,  # 3 (RGB), 1 (grayscale) or "auto" (1 if every image is)
        resize: str = "stretch",  # non-square images: "stretch", "center-crop" or "pad"
        ways: int = 5,  # classes per episode
        shots: int = 1,  # support images per class
        queries: int = 15,  # query images per class (the field's 15)
        val_episodes: int = 100,  # fixed meta-val episodes, on which trials are ranked
        test_episodes: int = 600,  # fixed meta-test episodes (the field reports 600)
        seed: int = 0,
        device: torch.device | str = "cpu",
        cache_dir: str | os.PathLike[str] | None = None,  # this machine's (--cache-dir)
    ) -> None:
        super().__init__(ways=ways, shots=shots, queries=queries, val_episodes=val_episodes,
                         test_episodes=test_episodes, seed=seed, device=device)
        for key, value in {"channels": channels, "resize": resize}.items():
            choices = self.params[key].choices  # type: ignore[union-attr]
            if value not in choices or isinstance(value, bool):
                raise ConfigError(f"{self.name}: {key}={value!r} is not one of {list(choices)}")
        if path is None:
            raise ConfigError(f"{self.name}: give the dataset's folder, e.g. --task-param "
                              f"path=data/{self.name} (or task_params={{'path': ...}}); it "
                              f"holds {self.hint}")
        self.root = Path(os.fspath(path))
        self.size, self.resize = size, resize
        check_root(self.root, self.name, self.hint)
        self.layout = self.read(self.root)
        self._check_episodes()
        store = open_store(self.layout.source, name=self.layout.store, size=size,
                           channels=channels, resize=resize, cache_dir=cache_dir)
        self.input_shape = tuple(store.shape[1:])  # (C, size, size)
        self.images = StoredImages(store, self.device)  # (n, C, size, size), gathered
        labels = torch.as_tensor(self.layout.labels, dtype=torch.int64)
        self.set_pools(*(ClassPool(self.images, labels, classes, name=f"{self.name} {split}")
                         for split, classes in zip(SPLITS, self.layout.splits, strict=True)))

    @abstractmethod
    def read(self, root: Path) -> Layout:
        """The layout of the dataset at ``root`` (an existing folder), checked by file name.

        Raises:
            DataError: a file of the layout is missing or malformed (naming it and what
                the layout expects), a split names missing images or unknown classes.
        """

    def _check_episodes(self) -> None:
        """Every split has ``ways`` classes and every class ``shots + queries`` images,
        named by class name and split file (before any image is decoded)."""
        layout = self.layout
        per_class = np.bincount(layout.labels, minlength=len(layout.class_names))
        for split, classes, listed in zip(SPLITS, layout.splits, layout.split_from,
                                          strict=True):
            if len(classes) < self.ways:
                raise DataError(
                    f"{self.name}: {self.ways}-way episodes need {self.ways} classes in every "
                    f"split; {split} ({listed}) has {len(classes)}; lower 'ways' or list more "
                    "classes in it")
        need = self.shots + self.queries
        short = [c for classes in layout.splits for c in classes if per_class[c] < need]
        if short:
            worst = min(short, key=lambda c: per_class[c])
            others = f" (and {len(short) - 1} other class(es))" if len(short) > 1 else ""
            raise DataError(
                f"{self.name}: class {layout.class_names[worst]!r} has {per_class[worst]} "
                f"image(s), fewer than shots + queries = {need}{others}; lower 'shots' or "
                "'queries'")

    def read_inputs(self, path: Path, *, labelled: bool) -> InputBatch:
        """Image files, or a folder of them, decoded as this task's images
        (:mod:`autometa_plugins.fewshot_datasets.inputs`; ``autometa predict``)."""
        return read_images(self, path, labelled=labelled)

    def describe(self) -> dict[str, Any]:
        layout = self.layout
        return {
            **super().describe(),
            "dataset": self.name,
            "path": str(self.root.resolve()),
            **layout.facts,
            "classes": sum(map(len, layout.splits)),
            "images": len(layout.labels),
            "class_split": dict(zip(SPLITS, map(len, layout.splits), strict=True)),
            "split_from": dict(zip(SPLITS, layout.split_from, strict=True)),
            "classes_by_split": {split: [layout.class_names[c] for c in classes]
                                 for split, classes in zip(SPLITS, layout.splits, strict=True)},
        }


# -- helpers the readers share -------------------------------------------------------------
def check_root(root: Path, name: str, hint: str) -> None:
    """Raise DataError unless ``root`` is an existing folder."""
    if not root.exists():
        where = "" if root.is_absolute() else f" (relative to the working directory {Path.cwd()})"
        raise DataError(f"{name}: path {str(root)!r} does not exist{where}; give the folder "
                        f"that holds {hint}")
    if not root.is_dir():
        raise DataError(f"{name}: path {str(root)!r} is a file, not a folder; give the folder "
                        f"that holds {hint} (unpack an archive first)")


def require(root: Path, relative: str, name: str, hint: str, *, folder: bool = False) -> Path:
    """``root / relative``, which must be a file (or a folder); else a DataError naming it
    and the layout it belongs to."""
    path = root / relative
    if folder and path.is_dir() or not folder and path.is_file():
        return path
    what = "folder" if folder else "file"
    found = "is missing" if not path.exists() else f"is not a {what}"
    raise DataError(f"{name}: {str(path)!r} {found}; the layout is {hint}; restore it, or "
                    "point path at the folder that holds the whole layout")


def first_of(problems: Sequence[str], noun: str) -> str:
    """``"'a' (and 3 more <noun>)"``: the first problem named, the rest counted."""
    more = f" (and {len(problems) - 1} more {noun})" if len(problems) > 1 else ""
    return f"{problems[0]}{more}"


def file_facts(files: Sequence[Path]) -> list[list[Any]]:
    """Each file's absolute path, size and modification time (a store key's facts)."""
    facts: list[list[Any]] = []
    for file in files:
        st = file.stat()
        facts.append([os.path.abspath(file), st.st_size, st.st_mtime_ns])
    return facts


def disjoint(splits: Sequence[Sequence[str]], split_from: Sequence[str], name: str) -> None:
    """Raise DataError if a class is listed in two splits (published splits are disjoint)."""
    seen: dict[str, str] = {}
    for classes, listed in zip(splits, split_from, strict=True):
        for cls in classes:
            if cls in seen and seen[cls] != listed:
                raise DataError(f"{name}: class {cls!r} is in both {seen[cls]} and {listed}; "
                                "the published splits are disjoint; list it in one of them")
            seen[cls] = listed


def read_lines(path: Path, name: str) -> list[str]:
    """The lines of text file ``path``; a DataError if it is not UTF-8 text."""
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise DataError(f"{name}: {str(path)!r} is not UTF-8 text (byte {exc.start}); the "
                        "layout's lists are plain text: use the published file") from None


def read_names(path: Path, name: str) -> list[tuple[int, str]]:
    """A split list: ``(line number, class name)`` for each non-empty line, stripped.

    Raises:
        DataError: a class listed twice, or no class at all.
    """
    listed: list[tuple[int, str]] = []
    seen: dict[str, int] = {}
    for number, line in enumerate(read_lines(path, name), 1):
        item = line.strip()
        if not item:
            continue
        if item in seen:
            raise DataError(f"{name}: {str(path)!r} lists {item!r} twice (lines {seen[item]} "
                            f"and {number}); list each class once")
        seen[item] = number
        listed.append((number, item))
    if not listed:
        raise DataError(f"{name}: {str(path)!r} lists no classes; it holds one class name "
                        "per line")
    return listed


def lookup(listed: list[tuple[int, str]], known: dict[str, int], path: Path, name: str,
           where: str) -> list[int]:
    """The class ids of the names in split list ``path``.

    Raises:
        DataError: names not in ``known`` (the first named with its line, the rest counted).
    """
    unknown = [f"{item!r} (line {number})" for number, item in listed if item not in known]
    if unknown:
        example = ", ".join(repr(k) for k in list(known)[:2])
        raise DataError(f"{name}: {str(path)!r} names {len(unknown)} class(es) that {where} "
                        f"does not have: {first_of(unknown, 'unknown')}; its classes are "
                        f"spelled as in {where} (e.g. {example})")
    return [known[item] for _, item in listed]


def one_after_another(groups: Sequence[Sequence[str]]
                      ) -> tuple[list[str], tuple[list[int], list[int], list[int]]]:
    """The class names of three splits listed one split after another, and the class ids
    of each split in that list."""
    names = [n for group in groups for n in group]
    bounds = np.cumsum([0, *map(len, groups)]).tolist()
    train, val, test = (list(range(bounds[k], bounds[k + 1])) for k in range(3))
    return names, (train, val, test)
