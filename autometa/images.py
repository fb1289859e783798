"""One image decoded at a task's size and channels, by a resize policy (Pillow).

Resize policies for images that are not square (``resize``):

* ``stretch``: scale each side to ``size`` (the aspect ratio changes; the default, as
  every image task decoded before policies existed);
* ``center-crop``: scale the shorter side to ``size`` and keep the central square (what
  torchvision's ``Resize(size)`` + ``CenterCrop(size)`` do; the edges are lost);
* ``pad``: scale the longer side to ``size`` and pad the rest with black, centred (the
  whole image is kept, smaller).

Colour: ``channels`` 1 converts colour to grayscale (Pillow's ``L``: ITU-R 601-2 luma),
3 converts grayscale to RGB (the gray value in each channel), ``"auto"`` keeps each image's
own (a gray mode gives (size, size), any other (size, size, 3)). Alpha is dropped; 16-bit
grayscale keeps its 8 most significant bits. Resampling is bilinear, antialiased when
shrinking (Pillow's ``resize``); JPEGs are decoded at a reduced scale first (``draft``).

Size: an image of more than :data:`MAX_PIXELS` pixels (width times height, read from its
header before any pixel is decoded) is refused, as a decompression bomb may be: a small
file that expands to gigabytes. The limit is Pillow's own warning threshold
(``PIL.Image.MAX_IMAGE_PIXELS``, about 9459 x 9459), enforced as an error rather than a
warning.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from autometa.errors import DataError
from autometa.numeric_inputs import InputBatch

if TYPE_CHECKING:
    from PIL import Image

__all__ = ["GRAY_MODES", "IMAGE_SUFFIXES", "MAX_PIXELS", "RESIZE_POLICIES", "PixelInputs",
           "decode_file", "decode_files", "decode_image", "image_files", "open_image",
           "read_new_images"]

RESIZE_POLICIES = ("stretch", "center-crop", "pad")
#: File suffixes read as images from a folder (case-insensitive); other files are skipped.
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff",
                            ".webp", ".ppm", ".pgm", ".pbm"})
#: Pillow modes without colour.
GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "F", "I;16", "I;16L", "I;16B", "I;16N"})
#: The most pixels (width x height) an image may have: Pillow's default
#: ``MAX_IMAGE_PIXELS`` (1024 * 1024 * 1024 // 4 // 3), above which it only warns below
#: twice the number. An RGB image this size takes 268 MB decoded.
MAX_PIXELS = 89_478_485
_OPENING = threading.Lock()


def open_image(fp: Any, name: str) -> Image.Image:
    """``fp`` (a path or a binary file) opened by Pillow, its pixel count checked from the
    header before anything is decoded.

    Args:
        fp: what ``PIL.Image.open`` accepts.
        name: how the image is named in an error (a file path, "image 3 of ...").

    Raises:
        DataError: more than :data:`MAX_PIXELS` pixels (a possible decompression bomb).
        Exception: whatever Pillow raises for a file it cannot read.
    """
    import warnings

    from PIL import Image

    # The check below replaces Pillow's warning. catch_warnings swaps the process's filters,
    # which is not thread-safe: the image store opens files from several threads, so they
    # take turns here (opening reads only the header; decoding happens outside the lock).
    with _OPENING, warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(fp)
        except Image.DecompressionBombError:
            image = None
    if image is None or image.size[0] * image.size[1] > MAX_PIXELS:
        size = "" if image is None else f" ({image.size[0]} x {image.size[1]})"
        if image is not None:
            image.close()
        raise DataError(f"{name} has more than {MAX_PIXELS:,} pixels{size}, which could be a "
                        "decompression bomb; shrink the image (e.g. Pillow's "
                        "Image.thumbnail) or remove it")
    return image


def decode_image(image: Image.Image, *, size: int, channels: int | str,
                 resize: str = "stretch") -> np.ndarray:
    """``image`` converted and resized: uint8 (size, size) grayscale or (size, size, 3) RGB.

    Args:
        image: an opened Pillow image (not yet loaded, so that JPEGs can use ``draft``).
        size: the side of the square result, in pixels.
        channels: 1, 3 or "auto" (see the module docstring).
        resize: one of :data:`RESIZE_POLICIES`.
    """
    from PIL import Image

    if resize not in RESIZE_POLICIES:
        raise ValueError(f"resize {resize!r} is not one of {RESIZE_POLICIES}")
    mode = "L" if channels == 1 or (channels == "auto" and image.mode in GRAY_MODES) \
        else "RGB"
    image.draft(mode, (size, size))  # JPEG: decode at a reduced scale, much faster
    if image.mode.startswith("I;16"):  # convert("L") would saturate 16-bit values
        image = Image.fromarray((np.asarray(image) >> 8).astype(np.uint8))
    image = image.convert(mode)
    width, height = image.size
    if resize == "stretch" or width == height:
        out = image.resize((size, size), Image.Resampling.BILINEAR)
    elif resize == "center-crop":
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        out = image.resize((size, size), Image.Resampling.BILINEAR,
                           box=(left, top, left + side, top + side))
    else:  # pad: the longer side becomes size
        scale = size / max(width, height)
        inner = (max(1, round(width * scale)), max(1, round(height * scale)))
        out = Image.new(mode, (size, size))
        out.paste(image.resize(inner, Image.Resampling.BILINEAR),
                  ((size - inner[0]) // 2, (size - inner[1]) // 2))
    return np.asarray(out)


def decode_file(file: Path, *, size: int, channels: int | str,
                resize: str = "stretch") -> tuple[np.ndarray, bool]:
    """One image file decoded by :func:`decode_image`, and whether it was square.

    Raises:
        DataError: a file Pillow cannot decode (naming it, with Pillow's error in brief).
    """
    try:
        with open_image(file, f"image {str(file)!r}") as opened:
            square = opened.size[0] == opened.size[1]
            return decode_image(opened, size=size, channels=channels, resize=resize), square
    except DataError:
        raise
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError, ... by format
        brief = str(exc).splitlines()[0] if str(exc) else "no details"
        brief = brief.replace(f" {str(file)!r}", "").replace(str(file), "<file>")[:120]
        raise DataError(f"cannot read image {str(file)!r} ({type(exc).__name__}: {brief}); "
                        "replace or delete the file") from exc


def decode_files(files: Sequence[Path], *, size: int, channels: int | str,
                 resize: str = "stretch", name: str = "") -> np.ndarray:
    """A few ``files`` decoded by :func:`decode_file`: uint8 pixels, (n, C, size, size).

    ``channels`` 1 or 3 converts every image; ``"auto"`` gives 1 if every image is
    grayscale (a gray mode, or R = G = B in every pixel) and 3 otherwise. For new inputs
    (``autometa predict``); a task's own images go through its store
    (:mod:`autometa.image_store`).

    Raises:
        DataError: a file Pillow cannot decode (naming it; prefixed ``name:`` if given).
    """
    pixels = np.empty((len(files), size, size, 3), dtype=np.uint8)  # (n, H, W, RGB)
    gray = np.ones(len(files), dtype=bool)
    for i, file in enumerate(files):
        try:
            image, _ = decode_file(file, size=size, channels=channels, resize=resize)
        except DataError as exc:
            raise DataError(f"{name}: {exc}" if name else str(exc)) from exc.__cause__
        if image.ndim == 2:  # (H, W)
            pixels[i] = image[..., None]
        else:
            pixels[i] = image
            gray[i] = bool((image[..., 1:] == image[..., :1]).all())
    keep = 1 if channels == 1 or (channels == "auto" and gray.all()) else 3
    return np.ascontiguousarray(pixels[..., :keep].transpose(0, 3, 1, 2))


def image_files(path: Path, *, what: str = "--input") -> list[Path]:
    """``path`` itself if it is a file, else the images in the folder ``path`` (searched
    recursively, by :data:`IMAGE_SUFFIXES`; hidden files and folders skipped), sorted.

    Raises:
        DataError: a folder without images (``what`` names where the path came from).
    """
    if not path.is_dir():
        return [path]
    files = sorted(f for f in path.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES
                   and f.is_file() and not any(p.startswith(".") for p in
                                               f.relative_to(path).parts))
    if not files:
        raise DataError(f"{what} {str(path)!r} holds no images "
                        f"({', '.join(sorted(IMAGE_SUFFIXES))}); give image files")
    return files


#: A support set's reader: its folder → the image files and each one's label.
SupportReader = Callable[[Path], tuple[list[Path], list[Any]]]


def read_new_images(path: Path, *, labelled: bool, support: SupportReader, support_hint: str,
                    input_shape: Sequence[int], resize: str, name: str) -> InputBatch:
    """New images for a built image task (its ``read_inputs``: ``autometa predict``,
    ``Predictor.adapt``/``predict`` given a path), decoded as the task decoded its own.

    Inputs (``labelled`` False, ``--input``) are an image file or a folder of them
    (:func:`image_files`). A support set (``--support``) is a folder read by ``support``,
    the task's own layout. Colour is converted to what the model takes: a colour photo for
    a grayscale model becomes gray, a gray one for a colour model RGB.

    Args:
        support_hint: what a support set is, in messages ("a folder with one sub-folder
            of images per class").
        input_shape: the task's (channels, size, size).
        resize: the task's resize policy (:data:`RESIZE_POLICIES`).
        name: the task's registered name, the first word of messages.

    Returns:
        An :class:`~autometa.numeric_inputs.InputBatch`: x (n, C, size, size) float32 in
        [0, 1]; labels (support sets) or None; ids, each file's path relative to ``path``
        (its name when ``path`` is a file).

    Raises:
        DataError: a support path that is a file, a folder without images, a support set
            ``support`` refuses, an image that cannot be decoded.
    """
    flag = "--support" if labelled else "--input"
    labels: list[Any] | None = None
    if labelled:
        if not path.is_dir():
            raise DataError(f"{name}: {flag} {str(path)!r} is a file; give {support_hint}")
        files, labels = support(path)
    else:
        try:
            files = image_files(path, what=flag)
        except DataError as exc:
            raise DataError(f"{name}: {exc}") from None
    pixels = decode_files(files, size=input_shape[-1], channels=input_shape[0],
                          resize=resize, name=f"{name}: {flag}")
    x = torch.from_numpy(pixels).float().div_(255)  # (n, C, size, size) in [0, 1]
    ids = [f.relative_to(path).as_posix() if path.is_dir() else f.name for f in files]
    return InputBatch(x, labels, ids, "file")


class PixelInputs(torch.nn.Module):
    """Images in [0, 1] as a pretrained network expects them, as a tensor operation:
    1-channel images repeated to 3 channels, resized (bilinear) to ``size``, and, given
    ``mean`` and ``std``, standardised per channel. (n, 1 or 3, H, W) -> (n, 3, *size).

    The shared input stage of the source models built on other libraries' networks
    (torchvision, timm, transformers); ``mean`` and ``std`` are constants, not state (left
    out of the ``state_dict``, moved with the module).
    """

    mean: torch.Tensor  # (1, 3, 1, 1) buffers
    std: torch.Tensor

    def __init__(self, size: tuple[int, int], mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None) -> None:
        super().__init__()
        self.size = size
        self.normalize = mean is not None and std is not None
        self.register_buffer("mean", torch.tensor(mean or (0.0,) * 3).view(1, -1, 1, 1),
                             persistent=False)
        self.register_buffer("std", torch.tensor(std or (1.0,) * 3).view(1, -1, 1, 1),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if tuple(x.shape[-2:]) != self.size:
            x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False)
        if self.normalize:
            x = (x - self.mean) / self.std
        return x
