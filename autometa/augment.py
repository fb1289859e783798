"""Meta-train image augmentation, applied to a whole batch at once on its device.

The few-shot literature trains with torchvision's ``RandomResizedCrop`` +
``ColorJitter(0.4, 0.4, 0.4)`` + ``RandomHorizontalFlip`` (MetaOptNet, "Meta-Learning with
Differentiable Convex Optimization", Lee et al. 2019; FEAT, Ye et al. 2020). This module
gives the same three transforms for a batch ``(n, C, H, W)`` of float images in ``[0, 1]``
already on the device: every random draw is one vectorised call on a caller's
``torch.Generator``, the crop and the flip are one ``grid_sample``, the jitter a few
broadcast operations.

It differs from torchvision in three documented ways: random numbers come from the
given generator in a batched layout (so the same seed gives other images than torchvision
would); the colour jitter's order is fixed (brightness, contrast, saturation) where
``ColorJitter`` permutes it per image; and there is no hue jitter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from autometa.errors import ConfigError, DataError

__all__ = ["Augmentation", "Draw", "color_jitter", "resized_crop"]

#: ``RandomResizedCrop``'s aspect ratios (width / height) and its number of tries.
RATIO = (3 / 4, 4 / 3)
ATTEMPTS = 10
#: ``rgb_to_grayscale``'s luma weights (torchvision's, after TensorFlow's).
GRAY = (0.2989, 0.587, 0.114)


@dataclass(frozen=True)
class Draw:
    """The random parameters of one augmented batch of ``n`` images.

    Attributes:
        boxes: (n, 4) int64 crop boxes in pixels, ``(top, left, height, width)`` as
            torchvision's ``(i, j, h, w)``; the whole image when the crop is off.
        flips: (n,) bool, True where the image is mirrored left-right.
        factors: (n, 3) brightness, contrast and saturation factors; ones when off.
    """

    boxes: Tensor
    flips: Tensor
    factors: Tensor


@dataclass(frozen=True)
class Augmentation:
    """Random resized crop, horizontal flip and colour jitter; all off by default.

    Raises:
        ConfigError: a setting out of its range or of the wrong type (the message names
            the setting, the value, the range and the fix).
    """

    crop_scale: float = 1.0  # smallest crop area fraction, in [0.08, 1]; 1 = no crop
    flip: bool = False  # mirror left-right with probability 0.5
    jitter: float = 0.0  # brightness/contrast/saturation factors ~ U(1-j, 1+j); 0 = off

    def __post_init__(self) -> None:
        _check_fraction("crop_scale", self.crop_scale, 0.08, "1.0 turns the crop off, "
                        "0.08 is torchvision's strongest")
        if not isinstance(self.flip, bool):
            raise ConfigError(f"augmentation flip={self.flip!r} is not a boolean; "
                              "set flip to true or false")
        _check_fraction("jitter", self.jitter, 0.0, "0 turns the jitter off, "
                        "0.4 is the few-shot papers' choice")

    @property
    def active(self) -> bool:
        """False when every setting is off (then :meth:`__call__` is the identity)."""
        return self.crop_scale < 1.0 or self.flip or self.jitter > 0.0

    def draw(self, x: Tensor, generator: torch.Generator) -> Draw:
        """Draw the parameters for the batch ``x`` (n, C, H, W) from ``generator``.

        The crop follows ``RandomResizedCrop.get_params``: per image, up to 10 tries of an
        area fraction ~ U(crop_scale, 1) and a log aspect ratio ~ U(log 3/4, log 4/3),
        rounded to whole pixels; the first box that fits is placed uniformly at random;
        if none fits, torchvision's centre crop. All tries are drawn at once, so the
        distribution is torchvision's; only the order of the random numbers differs.

        Args:
            x: (n, C, H, W) images; only their number, size and device are read.
            generator: on ``x.device``; draws, in order, for the crop, the flip and the
                jitter, nothing for a setting that is off.

        Returns:
            The batch's :class:`Draw`.
        """
        n, _, height, width = x.shape
        device = x.device
        boxes = torch.tensor([0, 0, height, width], device=device).repeat(n, 1)
        if self.crop_scale < 1.0:
            u = torch.rand(n, ATTEMPTS + 1, 2, generator=generator, device=device)
            boxes = _crop_boxes(height, width, self.crop_scale, u)
        flips = torch.zeros(n, dtype=torch.bool, device=device)
        if self.flip:
            flips = torch.rand(n, generator=generator, device=device) < 0.5
        factors = torch.ones(n, 3, device=device)
        if self.jitter > 0.0:
            u = torch.rand(n, 3, generator=generator, device=device)
            factors = 1.0 - self.jitter + 2.0 * self.jitter * u
        return Draw(boxes, flips, factors)

    def __call__(self, x: Tensor, generator: torch.Generator) -> Tensor:
        """Augment a batch.

        Args:
            x: (n, C, H, W) float images in [0, 1] on any device, C = 1 or 3.
            generator: the source of every random number; it lives on ``x.device``.

        Returns:
            A new (n, C, H, W) tensor of ``x``'s dtype and device, in [0, 1]; ``x`` itself
            when not :attr:`active`, and then nothing is drawn from ``generator`` (the
            episodes a seeded trial samples afterwards stay the same).

        Raises:
            DataError: ``x`` is not (n, 1 or 3, H, W) floating point.
        """
        if not self.active:
            return x
        _check_images(x)
        d = self.draw(x, generator)
        if self.crop_scale < 1.0:
            x = resized_crop(x, d.boxes, d.flips)
        elif self.flip:
            x = torch.where(d.flips[:, None, None, None], x.flip(-1), x)
        return color_jitter(x, d.factors) if self.jitter > 0.0 else x


def resized_crop(x: Tensor, boxes: Tensor, flips: Tensor) -> Tensor:
    """Crop each image to its box, resize it back to H x W (bilinear), mirror some.

    Equals torchvision's ``resized_crop(img, i, j, h, w, (H, W), BILINEAR)`` (a slice
    then ``interpolate(..., align_corners=False)``), then ``hflip`` where ``flips``, for
    the whole batch in one ``affine_grid`` + ``grid_sample``: the affine map sends the
    output's pixel centres onto the box's, a negative x scale mirrors, and clamping the
    sample points to the box's outer pixel centres repeats the box's edge as
    ``interpolate`` does instead of reading the pixels beyond it. A box is never larger
    than the image, so resizing only enlarges and torchvision's antialias plays no part.

    Args:
        x: (n, C, H, W) float images.
        boxes: (n, 4) ``(top, left, height, width)`` in pixels, inside the image.
        flips: (n,) bool.

    Returns:
        (n, C, H, W) tensor of ``x``'s dtype and device.
    """
    n, c, height, width = x.shape
    top, left, h, w = boxes.to(x.dtype).unbind(1)  # each (n,)
    mirror = 1.0 - 2.0 * flips.to(x.dtype)
    theta = torch.zeros(n, 2, 3, dtype=x.dtype, device=x.device)
    theta[:, 0, 0] = mirror * w / width  # normalised output x -> normalised input x
    theta[:, 0, 2] = (2 * left + w) / width - 1  # the box's centre
    theta[:, 1, 1] = h / height
    theta[:, 1, 2] = (2 * top + h) / height - 1
    grid = F.affine_grid(theta, [n, c, height, width], align_corners=False)  # (n, H, W, 2)
    size = torch.tensor([width, height], dtype=x.dtype, device=x.device)
    low = (2 * torch.stack([left, top], 1) + 1) / size - 1  # (n, 2): first pixel centre
    high = (2 * torch.stack([left + w, top + h], 1) - 1) / size - 1  # last pixel centre
    grid = torch.minimum(torch.maximum(grid, low[:, None, None]), high[:, None, None])
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def color_jitter(x: Tensor, factors: Tensor) -> Tensor:
    """torchvision's ``adjust_brightness``, ``adjust_contrast``, ``adjust_saturation``.

    In that fixed order, per image, each followed by a clamp to [0, 1] as torchvision's
    ``_blend``: brightness multiplies by b; contrast blends with the mean of the image's
    grayscale (one number per image) by c; saturation blends with the grayscale image
    by s, only when C = 3 (torchvision leaves a one-channel image unchanged).

    Args:
        x: (n, C, H, W) float images in [0, 1], C = 1 or 3.
        factors: (n, 3) non-negative factors (b, c, s); 1 leaves the image unchanged.

    Returns:
        (n, C, H, W) tensor of ``x``'s dtype and device, in [0, 1].
    """
    b, c, s = factors.to(x.dtype)[:, :, None, None, None].unbind(1)  # each (n, 1, 1, 1)
    x = (b * x).clamp(0.0, 1.0)
    x = (c * x + (1 - c) * _gray(x).mean(dim=(1, 2, 3), keepdim=True)).clamp(0.0, 1.0)
    if x.shape[1] == 3:
        x = (s * x + (1 - s) * _gray(x)).clamp(0.0, 1.0)
    return x


def _gray(x: Tensor) -> Tensor:
    """(n, 1, H, W) luma of (n, C, H, W) images; a one-channel image is its own."""
    if x.shape[1] == 1:
        return x
    weights = torch.tensor(GRAY, dtype=x.dtype, device=x.device)
    return (x * weights[:, None, None]).sum(dim=1, keepdim=True)


def _crop_boxes(height: int, width: int, scale: float, u: Tensor) -> Tensor:
    """(n, 4) boxes from uniforms ``u`` (n, ATTEMPTS + 1, 2).

    ``u[:, :ATTEMPTS]`` holds each try's (area, log ratio), ``u[:, ATTEMPTS]`` the
    (top, left) of the box kept.
    """
    lo, hi = math.log(RATIO[0]), math.log(RATIO[1])
    tries, where = u[:, :ATTEMPTS], u[:, ATTEMPTS]  # (n, tries, 2), (n, 2)
    area = height * width * (scale + (1 - scale) * tries[..., 0])  # (n, tries) pixels
    ratio = torch.exp(lo + (hi - lo) * tries[..., 1])
    w = torch.round(torch.sqrt(area * ratio))
    h = torch.round(torch.sqrt(area / ratio))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)  # (n, tries)
    first = torch.argmax(fits.to(torch.uint8), dim=1, keepdim=True)  # first True, or 0
    w, h = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0]  # (n,)
    fell_back = ~fits.any(dim=1)
    fh, fw = _centre_box(height, width)
    h = torch.where(fell_back, torch.full_like(h, fh), h)
    w = torch.where(fell_back, torch.full_like(w, fw), w)
    # randint(0, H - h + 1) as floor(u * (H - h + 1)); the fallback is centred.
    top = torch.floor(where[:, 0] * (height - h + 1)).clamp(max=height - h)
    left = torch.floor(where[:, 1] * (width - w + 1)).clamp(max=width - w)
    top = torch.where(fell_back, torch.div(height - h, 2, rounding_mode="floor"), top)
    left = torch.where(fell_back, torch.div(width - w, 2, rounding_mode="floor"), left)
    return torch.stack([top, left, h, w], dim=1).long()


def _centre_box(height: int, width: int) -> tuple[int, int]:
    """``RandomResizedCrop.get_params``' fallback (height, width) after 10 failed tries."""
    in_ratio = width / height
    if in_ratio < RATIO[0]:
        return int(round(width / RATIO[0])), width
    if in_ratio > RATIO[1]:
        return height, int(round(height * RATIO[1]))
    return height, width


def _check_fraction(name: str, value: object, low: float, fix: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"augmentation {name}={value!r} is not a number; "
                          f"set {name} to a number in [{low}, 1.0] ({fix})")
    if not low <= value <= 1.0:
        raise ConfigError(f"augmentation {name}={value!r} is out of range [{low}, 1.0]; "
                          f"set {name} within it ({fix})")


def _check_images(x: Tensor) -> None:
    if x.ndim != 4 or x.shape[1] not in (1, 3) or not x.is_floating_point():
        raise DataError(f"augmentation needs float images (n, 1 or 3, H, W), got "
                        f"{x.dtype} {tuple(x.shape)}; convert the batch to float in [0, 1]")
