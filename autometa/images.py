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
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from autometa.errors import DataError

if TYPE_CHECKING:
    from PIL import Image

__all__ = ["GRAY_MODES", "RESIZE_POLICIES", "decode_file", "decode_image"]

RESIZE_POLICIES = ("stretch", "center-crop", "pad")
#: Pillow modes without colour.
GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "F", "I;16", "I;16L", "I;16B", "I;16N"})


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
    from PIL import Image

    try:
        with Image.open(file) as opened:
            square = opened.size[0] == opened.size[1]
            return decode_image(opened, size=size, channels=channels, resize=resize), square
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError, ... by format
        brief = str(exc).splitlines()[0] if str(exc) else "no details"
        brief = brief.replace(f" {str(file)!r}", "").replace(str(file), "<file>")[:120]
        raise DataError(f"cannot read image {str(file)!r} ({type(exc).__name__}: {brief}); "
                        "replace or delete the file") from exc
