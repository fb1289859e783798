"""The synthetic image folders that ``data_scale.py`` builds stores from.

* :func:`write_folder`: distinct JPEGs in ``root/<class>/`` (mini-ImageNet's size: 100
  classes x 600 images at 84x84), each class a colour, each image that colour under a
  gradient of its own and some noise: cheap to make, and a JPEG that decodes like a photo
  of its size (about 3-5 KB at quality 85);
* :func:`write_linked`: tiered-ImageNet's size (779,165 images in 608 classes) from a few
  distinct JPEGs and hard links to them. Writing 779k distinct JPEGs takes too long here;
  the store's build still opens and decodes every path (only the bytes repeat, and they
  sit in the page cache), so the decoding, the file handling and the store's size are
  those of the real dataset, while reading from a cold disk is not measured.

Both time themselves and return what they made.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

#: JPEG quality of the written images (Pillow's default is 75).
QUALITY = 85


def class_colour(label: int, seed: int) -> np.ndarray:
    """The colour of class ``label``: RGB in [40, 215]."""
    return np.random.default_rng([seed, label]).uniform(40, 215, size=3)


def synthetic_image(rng: np.random.Generator, colour: np.ndarray, size: int) -> np.ndarray:
    """uint8 (size, size, 3): ``colour``, a random linear gradient and Gaussian noise."""
    ramp = np.linspace(-1.0, 1.0, size)
    direction = rng.normal(size=(2, 3)) * 40  # per channel, along y and x
    image = (colour + ramp[:, None, None] * direction[0] + ramp[None, :, None] * direction[1]
             + rng.normal(0, 12, size=(size, size, 3)))
    return np.clip(image, 0, 255).astype(np.uint8)


def _write_class(job: tuple[Path, int, int, int, int]) -> int:
    """Write one class folder's images; return their bytes."""
    from PIL import Image

    folder, label, count, size, seed = job
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, label, 1])
    colour = class_colour(label, seed)
    total = 0
    for i in range(count):
        path = folder / f"{i:05d}.jpg"
        Image.fromarray(synthetic_image(rng, colour, size)).save(path, quality=QUALITY)
        total += path.stat().st_size
    return total


def class_name(label: int) -> str:
    return f"n{label:08d}"  # WordNet-like ids, as ImageNet's folders are named


def write_folder(root: Path, counts: Sequence[int], *, size: int, seed: int = 0,
                 processes: int | None = None) -> dict[str, Any]:
    """``counts[c]`` distinct JPEGs of ``size`` x ``size`` in ``root/<class c>/``.

    Written by ``processes`` processes (default: one per core), class by class.
    """
    processes = processes or os.cpu_count() or 1
    jobs = [(root / class_name(c), c, n, size, seed) for c, n in enumerate(counts)]
    start = time.perf_counter()
    with multiprocessing.get_context("fork").Pool(processes) as pool:
        sizes = pool.map(_write_class, jobs, chunksize=1)
    seconds = time.perf_counter() - start
    images = sum(counts)
    return {"root": str(root), "images": images, "classes": len(counts), "distinct": images,
            "size": size, "seconds": seconds, "images_per_s": images / seconds,
            "bytes": sum(sizes), "mean_file_bytes": sum(sizes) / images,
            "processes": processes}


def even_counts(total: int, classes: int) -> list[int]:
    """``total`` images over ``classes`` classes, as even as possible (larger ones first)."""
    base, extra = divmod(total, classes)
    return [base + (c < extra) for c in range(classes)]


def write_linked(root: Path, counts: Sequence[int], *, distinct: int, size: int,
                 seed: int = 0) -> dict[str, Any]:
    """``root/<class c>/`` with ``counts[c]`` hard links to ``distinct`` JPEGs.

    The distinct files sit in ``root.parent/<root.name>-distinct/`` (in one class of
    :func:`write_folder` per 100 files); link ``k`` (over all classes, in order) points
    at distinct file ``k % distinct``, so every class mixes many of them.
    """
    source = root.parent / f"{root.name}-distinct"
    per = 100
    made = write_folder(source, even_counts(distinct, -(-distinct // per)), size=size,
                        seed=seed)
    files = sorted(source.rglob("*.jpg"))
    start = time.perf_counter()
    k = 0
    for c, n in enumerate(counts):
        folder = root / class_name(c)
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            os.link(files[k % len(files)], folder / f"{i:05d}.jpg")
            k += 1
    link_s = time.perf_counter() - start
    return {"root": str(root), "images": k, "classes": len(counts), "distinct": len(files),
            "size": size, "seconds": made["seconds"] + link_s,
            "distinct_seconds": made["seconds"], "link_seconds": link_s,
            "images_per_s": k / (made["seconds"] + link_s),
            "bytes": made["bytes"], "mean_file_bytes": made["mean_file_bytes"],
            "hard_links": True}


def remove_tree(root: Path) -> float:
    """Delete ``root`` (and a linked folder's distinct files); seconds taken."""
    import shutil

    start = time.perf_counter()
    for path in (root, root.parent / f"{root.name}-distinct"):
        shutil.rmtree(path, ignore_errors=True)
    return time.perf_counter() - start
