"""Omniglot (Lake et al., Human-level concept learning through probabilistic program
induction, Science 2015): 1,623 handwritten characters of 50 alphabets, 20 drawings each.

Layout (as ``images_background.zip`` and ``images_evaluation.zip`` from
github.com/brendenlake/omniglot unpack): ``path/images_background/<alphabet>/<character>/
*.png`` (30 alphabets, 964 characters) and ``path/images_evaluation/<alphabet>/<character>/
*.png`` (20 alphabets, 659 characters). A class is one character, named
``"<alphabet>/<character>"``.

Split: Lake et al.'s own. Meta-test is ``images_evaluation``; meta-train is
``images_background``. Lake et al. publish no validation alphabets, so meta-val is
``val_alphabets`` whole background alphabets (default 5), drawn from the seed and held out
of meta-train: no alphabet is seen both in training and in the choice between trials, and
none of meta-test's is seen before the leaderboard. (Vinyals et al.'s 1,200/423 character
split mixes the two folders and is not what this task reads; neither are the rotated
copies some papers add as extra classes.)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from autometa import ConfigError, DataError, Int
from autometa.datasets import split_classes
from autometa.image_store import FileImages
from autometa.space import SearchSpace
from autometa_plugins.fewshot_datasets.benchmark import (
    BenchmarkTask,
    Layout,
    require,
)
from autometa_plugins.fewshot_datasets.folders import class_folders, visible

NAME = "omniglot"
HINT = ("path/images_background/<alphabet>/<character>/<image>.png (meta-train) and "
        "path/images_evaluation/<alphabet>/<character>/<image>.png (meta-test)")
FOLDERS = ("images_background", "images_evaluation")


class Omniglot(BenchmarkTask):
    """Omniglot few-shot episodes over Lake et al.'s background/evaluation split, with
    seeded whole background alphabets for meta-val (module docstring)."""

    name = NAME
    hint = HINT
    params: ClassVar[SearchSpace] = {**BenchmarkTask.params, "val_alphabets": Int(1, 29)}

    def __init__(
        self,
        *,
        path: str | os.PathLike[str] | None = None,  # the folder holding images_background/
        val_alphabets: int = 5,  # background alphabets held out for meta-val (seeded)
        size: int = 28,  # images are resized to size x size (the field's 28)
        channels: int | str = 1,  # 1 (grayscale), 3 (RGB) or "auto"
        resize: str = "stretch",  # (Omniglot's images are square: no effect)
        ways: int = 5,  # classes per episode
        shots: int = 1,  # support images per class
        queries: int = 15,  # query images per class (of 20 drawings per character)
        val_episodes: int = 100,  # fixed meta-val episodes, on which trials are ranked
        test_episodes: int = 600,  # fixed meta-test episodes (the field reports 600)
        seed: int = 0,
        device: torch.device | str = "cpu",
        cache_dir: str | os.PathLike[str] | None = None,  # this machine's (--cache-dir)
    ) -> None:
        if isinstance(val_alphabets, bool) or val_alphabets < 1:
            raise ConfigError(f"{NAME}: val_alphabets={val_alphabets!r}; hold out at least 1 "
                              "background alphabet for meta-val")
        self.val_alphabets = val_alphabets
        super().__init__(path=path, size=size, channels=channels, resize=resize, ways=ways,
                         shots=shots, queries=queries, val_episodes=val_episodes,
                         test_episodes=test_episodes, seed=seed, device=device,
                         cache_dir=cache_dir)

    def read(self, root: Path) -> Layout:
        background, evaluation = (require(root, f, NAME, HINT, folder=True) for f in FOLDERS)
        found = [_characters(background), _characters(evaluation)]
        alphabets = sorted({a for a, _, _ in found[0]})
        if self.val_alphabets >= len(alphabets):
            raise DataError(f"{NAME}: val_alphabets={self.val_alphabets} leaves no background "
                            f"alphabet for meta-train; {str(background)!r} has "
                            f"{len(alphabets)}; lower val_alphabets")
        # split_classes draws on the CPU from the seed: the same alphabets on every device.
        train_alphabets, val = split_classes(alphabets, [len(alphabets) - self.val_alphabets,
                                                         self.val_alphabets], self.seed,
                                             name=NAME)
        held_out = set(val)
        characters = found[0] + found[1]
        class_names = [f"{alphabet}/{character}" for alphabet, character, _ in characters]
        n_background = len(found[0])
        splits = ([i for i in range(n_background) if characters[i][0] not in held_out],
                  [i for i in range(n_background) if characters[i][0] in held_out],
                  list(range(n_background, len(characters))))
        files = [f for _, _, images in characters for f in images]
        labels = np.repeat(np.arange(len(characters)), [len(im) for _, _, im in characters])
        return Layout(FileImages(files, slot=str(root.resolve())), labels.astype(np.int64),
                      class_names, splits,
                      ("images_background", f"images_background ({len(val)} alphabets held "
                       "out)", "images_evaluation"), store=NAME,
                      facts={"format": "Lake et al.'s background/evaluation folders",
                             "val_alphabets": sorted(val),
                             "train_alphabets": sorted(train_alphabets)})


def _characters(folder: Path) -> list[tuple[str, str, list[Path]]]:
    """``(alphabet, character, images)`` of every character folder, sorted.

    Raises:
        DataError: no alphabet folders, an alphabet without characters, a character
            without images.
    """
    _, alphabets = visible(folder)
    if not alphabets:
        raise DataError(f"{NAME}: {str(folder)!r} has no alphabet folders; the layout is "
                        f"{HINT}")
    return [(alphabet.name, character, images) for alphabet in alphabets
            for character, images in class_folders(alphabet, NAME, HINT)]
