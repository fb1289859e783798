"""autometa.augment against per-image references written here (float64, Python loops)."""

from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F

from autometa.augment import Augmentation, color_jitter, resized_crop
from autometa.errors import ConfigError, DataError

GRAY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights


def images(n: int, c: int, h: int = 12, w: int = 10, seed: int = 0,
           dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.rand(n, c, h, w, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def reference_crop(img: torch.Tensor, box: list[int], flip: bool) -> torch.Tensor:
    """torchvision's resized_crop + hflip on one (C, H, W) image: slice, interpolate."""
    i, j, h, w = box
    out = F.interpolate(img[None, :, i:i + h, j:j + w], size=img.shape[1:], mode="bilinear",
                        align_corners=False)[0]
    return torch.flip(out, dims=[-1]) if flip else out


def reference_jitter(img: torch.Tensor, b: float, c: float, s: float) -> torch.Tensor:
    """torchvision's adjust_brightness, _contrast, _saturation on one (C, H, W) image."""
    def gray(t: torch.Tensor) -> torch.Tensor:
        if t.shape[0] == 1:
            return t
        return GRAY[0] * t[0:1] + GRAY[1] * t[1:2] + GRAY[2] * t[2:3]

    img = (b * img).clamp(0, 1)
    img = (c * img + (1 - c) * gray(img).mean()).clamp(0, 1)
    if img.shape[0] == 3:
        img = (s * img + (1 - s) * gray(img)).clamp(0, 1)
    return img


def test_inactive_returns_the_input_and_draws_nothing() -> None:
    x = images(4, 3)
    generator = seeded(0)
    before = generator.get_state()
    augment = Augmentation()
    assert not augment.active
    assert augment(x, generator) is x
    assert torch.equal(generator.get_state(), before)
    assert Augmentation(crop_scale=0.5).active
    assert Augmentation(flip=True).active
    assert Augmentation(jitter=0.1).active


@pytest.mark.parametrize("channels", [1, 3])
def test_resized_crop_matches_slice_and_interpolate(channels: int) -> None:
    x = images(16, channels, dtype=torch.float64)
    rng = random.Random(channels)
    boxes, flips = [], []
    for k in range(16):
        h, w = (12, 10) if k == 0 else (rng.randint(1, 12), rng.randint(1, 10))
        boxes.append([rng.randint(0, 12 - h), rng.randint(0, 10 - w), h, w])
        flips.append(k % 3 == 1)
    out = resized_crop(x, torch.tensor(boxes), torch.tensor(flips))
    assert out.shape == x.shape and out.dtype == torch.float64
    for k in range(16):
        expected = reference_crop(x[k], boxes[k], flips[k])
        torch.testing.assert_close(out[k], expected, rtol=0, atol=1e-12)


def test_whole_image_box_is_the_identity_and_flip_is_torch_flip() -> None:
    x = images(6, 3)
    whole = torch.tensor([[0, 0, 12, 10]] * 6)
    flips = torch.tensor([False, True] * 3)
    out = resized_crop(x, whole, flips)
    torch.testing.assert_close(out[0::2], x[0::2], rtol=0, atol=1e-6)
    torch.testing.assert_close(out[1::2], torch.flip(x[1::2], dims=[-1]), rtol=0, atol=1e-6)


@pytest.mark.parametrize("channels", [1, 3])
def test_color_jitter_matches_torchvision_formulas(channels: int) -> None:
    x = images(8, channels, dtype=torch.float64)
    factors = torch.tensor([[1.0, 1.0, 1.0], [1.4, 1.0, 1.0], [1.0, 0.6, 1.0],
                            [1.0, 1.0, 0.0], [0.6, 1.4, 1.4], [1.4, 1.4, 0.6],
                            [0.0, 1.0, 1.0], [2.0, 2.0, 2.0]], dtype=torch.float64)
    out = color_jitter(x, factors)
    torch.testing.assert_close(out[0], x[0], rtol=0, atol=1e-12)
    for k in range(8):
        expected = reference_jitter(x[k], *factors[k].tolist())
        torch.testing.assert_close(out[k], expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("channels", [1, 3])
def test_call_is_draw_then_apply(channels: int) -> None:
    x = images(10, channels)
    augment = Augmentation(crop_scale=0.08, flip=True, jitter=0.4)
    d = augment.draw(x, seeded(3))
    expected = color_jitter(resized_crop(x, d.boxes, d.flips), d.factors)
    torch.testing.assert_close(augment(x, seeded(3)), expected, rtol=0, atol=0)


def test_flip_only_mirrors_about_half_the_images() -> None:
    x = images(200, 3, 6, 5)
    out = Augmentation(flip=True)(x, seeded(1))
    same = (out == x).flatten(1).all(1)
    mirrored = (out == torch.flip(x, dims=[-1])).flatten(1).all(1)
    assert bool((same | mirrored).all())
    assert 60 < int(mirrored.sum()) < 140 and int(same.sum()) > 60


@pytest.mark.parametrize("channels", [1, 3])
def test_seeded_output_shape_dtype_and_range(channels: int) -> None:
    x = images(20, channels)
    augment = Augmentation(crop_scale=0.3, flip=True, jitter=0.4)
    first, again, other = augment(x, seeded(7)), augment(x, seeded(7)), augment(x, seeded(8))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert first is not x and first.shape == x.shape
    assert first.dtype == x.dtype and first.device == x.device
    assert float(first.min()) >= 0.0 and float(first.max()) <= 1.0


@pytest.mark.parametrize(("height", "width", "scale"), [(84, 84, 0.08), (84, 84, 0.9),
                                                        (40, 60, 0.2)])
def test_boxes_follow_random_resized_crop(height: int, width: int, scale: float) -> None:
    """Inside the image; area and aspect within range (to a pixel) or the centre fallback."""
    boxes = Augmentation(crop_scale=scale).draw(images(2000, 1, height, width), seeded(0)).boxes
    top, left, h, w = boxes.T
    assert bool(((top >= 0) & (left >= 0) & (h >= 1) & (w >= 1)).all())
    assert bool(((top + h <= height) & (left + w <= width)).all())
    # torchvision's fallback after 10 failed tries: the largest centred box of ratio 4/3.
    if width / height > 4 / 3:
        fh, fw = height, round(height * 4 / 3)
    else:
        fh, fw = height, width
    fallback = (h == fh) & (w == fw) & (top == (height - fh) // 2) & (left == (width - fw) // 2)
    tried = ~fallback
    slack = 1.0 / min(height, width)  # rounding to whole pixels
    h, w = h[tried].double(), w[tried].double()
    area = h * w / (height * width)
    assert float(area.min()) >= scale * (1 - 2 * slack) and float(area.max()) <= 1.0
    log_ratio = torch.log(w / h)
    assert float(log_ratio.abs().max()) <= math.log(4 / 3) + 3 * slack
    # The area fraction is spread over [scale, 1], not piled at one end.
    assert float(area.max() - area.min()) > 0.5 * (1 - scale)


def test_no_box_fits_gives_torchvision_centre_crop() -> None:
    """30 x 80 at >= 90% of the area needs a ratio >= 2.4: every image falls back."""
    boxes = Augmentation(crop_scale=0.9).draw(images(50, 3, 30, 80), seeded(0)).boxes
    assert boxes.tolist() == [[0, 20, 30, 40]] * 50


def test_jitter_factors_are_uniform_in_range() -> None:
    factors = Augmentation(jitter=0.4).draw(images(4000, 3, 2, 2), seeded(0)).factors
    assert float(factors.min()) >= 0.6 and float(factors.max()) <= 1.4
    torch.testing.assert_close(factors.mean(0), torch.ones(3), rtol=0, atol=0.02)


@pytest.mark.parametrize(("setting", "value"), [
    ("crop_scale", 0.01), ("crop_scale", 1.5), ("crop_scale", "big"),
    ("jitter", -0.1), ("jitter", 2), ("jitter", True), ("flip", "yes"),
])
def test_bad_settings_name_the_setting(setting: str, value: object) -> None:
    with pytest.raises(ConfigError, match=rf"^augmentation {setting}=") as caught:
        Augmentation(**{setting: value})  # type: ignore[arg-type]
    assert "\n" not in str(caught.value) and f"set {setting}" in str(caught.value)


def test_bad_images_are_a_data_error() -> None:
    with pytest.raises(DataError, match="1 or 3"):
        Augmentation(flip=True)(torch.rand(2, 4, 5, 5), seeded(0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_for_the_same_parameters() -> None:
    x = images(64, 3, 84, 84)
    augment = Augmentation(crop_scale=0.08, flip=True, jitter=0.4)
    d = augment.draw(x, seeded(0))
    cpu = color_jitter(resized_crop(x, d.boxes, d.flips), d.factors)
    cuda = color_jitter(resized_crop(x.cuda(), d.boxes.cuda(), d.flips.cuda()), d.factors.cuda())
    torch.testing.assert_close(cuda.cpu(), cpu, rtol=0, atol=1e-5)
    generator = torch.Generator(device="cuda").manual_seed(0)
    out = augment(x.cuda(), generator)
    assert out.device.type == "cuda" and out.shape == x.shape
    assert torch.equal(out, augment(x.cuda(), torch.Generator(device="cuda").manual_seed(0)))
