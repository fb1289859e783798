"""Procedural glyphs: a few random pen strokes per class, a random distortion per instance.

A **class** is a template of ``strokes // 2`` to ``strokes`` cubic Bézier pen strokes
(lines, arcs, hooks and S-curves), a stroke often starting on an earlier one (a continued
or crossing pen line, as in handwritten characters), centred and scaled to fill about 60%
of the image.
An **instance** jitters the template's control points and junctions, then applies a
random rotation, scale, aspect change, shear and shift, and a random pen width. The
strokes are rendered with anti-aliasing from the exact distance of each pixel to dense
samples of the curves.

Randomness is **addressed, not streamed**: every random number is a hash of integer keys
(see :class:`Keyed`), so a class's template is a pure function of (seed, split, class
index) and an instance of (seed, split, class index, example index), on any device and
whatever else is generated in the same call. Everything is vectorised over classes,
instances, strokes and curve samples; the only Python loops are over the (few) strokes,
to resolve junctions, and over chunks of images, to bound memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
from torch import Tensor

SIDE = 28  # image height and width, pixels
SAMPLES = 32  # points per stroke; <= 0.8 px apart for the longest strokes
EXTENT = 1.2  # a template's larger side, in image half-widths (the image spans [-1, 1])
CHUNK = 2048  # images rendered at once (about 90 MB of temporaries)

_MASK = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9
# Streams of the hash: template numbers and instance numbers never share keys.
_TEMPLATE, _INSTANCE = 1, 2
# Last keys of an instance's numbers: control-point jitter (stroke * 8 + point * 2 +
# coordinate, below 64 as strokes <= 8), junction jitter (+ stroke), pose and pen width.
_JITTER, _JUNCTION, _POSE = 0, 100, 200


def _mul32(x: Tensor, c: int) -> Tensor:
    """``x * c mod 2**32`` for 32-bit values in an int64 tensor, with no int64 overflow."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _MASK


def _mix(x: Tensor) -> Tensor:
    # lowbias32 (C. Wellons): a bijection of 32-bit integers with a strong avalanche.
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


class Keyed:
    """Random numbers addressed by integer keys: the same keys give the same numbers.

    ``Keyed(seed, stream)`` prefixes every address; ``uniform(*keys)`` broadcasts its keys
    (ints or int64 tensors, each below 2**32) and hashes them in order, so the numbers do
    not depend on the shapes of the call nor on the device.
    """

    def __init__(self, *prefix: int, device: torch.device) -> None:
        self.head = torch.zeros((), dtype=torch.int64, device=device)
        for key in prefix:  # a seed may exceed 32 bits: hash both halves
            self.head = self._fold(self._fold(self.head, key & _MASK), (key >> 32) & _MASK)

    @staticmethod
    def _fold(h: Tensor, key: Tensor | int) -> Tensor:
        return _mix(((h + _GOLDEN) & _MASK) ^ key)

    def uniform(self, *keys: Tensor | int) -> Tensor:
        """Floats in (0, 1), 24 random bits each, shaped like the broadcast keys."""
        h = self.head
        for key in keys:
            h = self._fold(h, key)
        return ((h >> 8).float() + 0.5) / 2**24

    def normal(self, *keys: Tensor | int) -> Tensor:
        """Standard normal floats (Box-Muller on two uniforms addressed by ``keys``)."""
        u, v = self.uniform(*keys, 0), self.uniform(*keys, 1)
        return torch.sqrt(-2 * torch.log(u)) * torch.cos(2 * math.pi * v)


@dataclass(frozen=True)
class Templates:
    """Stroke templates of C classes, S = the most strokes; points in image half-widths."""

    start: Tensor  # (C, S, 2) first control point of each stroke (if not attached)
    shape: Tensor  # (C, S, 3, 2) the other three control points, relative to the start
    attach: Tensor  # (C, S) long: the earlier stroke this one starts on, or -1
    at: Tensor  # (C, S) curve parameter in [0, 1] of that starting point
    active: Tensor  # (C, S) bool: stroke drawn (classes have different stroke counts)


def _bezier(control: Tensor, t: Tensor) -> Tensor:
    """Points of cubic Béziers: control (..., 4, 2), t (..., T) -> (..., T, 2)."""
    s = 1 - t
    basis = torch.stack([s**3, 3 * s**2 * t, 3 * s * t**2, t**3], -1)  # (..., T, 4)
    return basis @ control


def _controls(start: Tensor, shape: Tensor, attach: Tensor, at: Tensor) -> Tensor:
    """Absolute control points (C, S, 4, 2), each attached stroke moved onto its anchor."""

    def stroke(first: Tensor, j: int) -> Tensor:  # first (C, 2) -> (C, 4, 2)
        return torch.cat([first[:, None], first[:, None] + shape[:, j]], 1)

    strokes = [stroke(start[:, 0], 0)]
    for j in range(1, start.shape[1]):  # junctions refer to earlier strokes only
        earlier = torch.stack(strokes, 1)  # (C, j, 4, 2)
        on = earlier[torch.arange(len(start), device=start.device), attach[:, j].clamp(min=0)]
        anchor = _bezier(on, at[:, j, None])[:, 0]  # (C, 2)
        strokes.append(stroke(torch.where(attach[:, j, None] >= 0, anchor, start[:, j]), j))
    return torch.stack(strokes, 1)


def templates(keyed: Keyed, classes: Tensor, strokes: int) -> Templates:
    """Templates of ``classes`` (C,) long keys, drawn from ``keyed`` (stream-prefixed)."""
    device = classes.device
    c = classes[:, None]  # (C, 1)
    j = torch.arange(strokes, device=device)[None, :]  # (1, S)

    def u(field: int) -> Tensor:  # (C, S): one number per class, stroke and field
        return keyed.uniform(c, j, field)

    lowest = max(1, strokes // 2)
    count = lowest + (keyed.uniform(classes, 99) * (strokes - lowest + 1)).long()  # (C,)
    active = j < count[:, None]
    start = torch.stack([u(0), u(1)], -1) * 1.6 - 0.8  # (C, S, 2)
    angle, length = 2 * math.pi * u(2), 0.5 + 0.8 * u(3)
    chord = torch.stack([angle.cos(), angle.sin()], -1) * length[..., None]  # (C, S, 2)
    normal = torch.stack([-angle.sin(), angle.cos()], -1) * length[..., None]
    bend1, bend2 = (u(4) * 2 - 1) * 0.7, (u(5) * 2 - 1) * 0.7  # arcs, hooks, S-curves
    shape = torch.stack([chord / 3 + normal * bend1[..., None],
                         chord * 2 / 3 + normal * bend2[..., None], chord], -2)  # (C, S, 3, 2)
    # 70% of later strokes start on an earlier one: at its end (pen continues), its
    # start, or somewhere along it (a crossing or a T).
    attached = (u(6) < 0.7) & (j > 0)
    attach = torch.where(attached, (u(7) * j).long(), -1)
    kind = u(8)
    at = torch.where(kind < 0.4, 1.0, torch.where(kind < 0.5, 0.0, 0.15 + 0.7 * u(9)))
    # Centre the glyph's bounding box and scale its larger side to EXTENT.
    points = _bezier(_controls(start, shape, attach, at),
                     torch.linspace(0, 1, SAMPLES, device=device))  # (C, S, T, 2)
    drawn = active[..., None, None]
    low = torch.where(drawn, points, math.inf).amin((1, 2))  # (C, 2)
    high = torch.where(drawn, points, -math.inf).amax((1, 2))
    centre, size = (low + high) / 2, (high - low).amax(-1)  # (C, 2), (C,)
    scale = (EXTENT / size)[:, None, None]
    return Templates((start - centre[:, None]) * scale, shape * scale[..., None], attach, at,
                     active)


def instances(
    keyed: Keyed, template: Templates, classes: Tensor, examples: Tensor, distortion: float,
) -> tuple[Tensor, Tensor]:
    """Distorted strokes for N (class, example) keys: control points (N, S, 4, 2) in
    pixel coordinates and pen half-widths (N,) in pixels.

    ``template`` holds the N instances' class templates (indexed already); ``distortion``
    scales every random change (0: each instance is its template).
    """
    d = distortion
    strokes = template.active.shape[1]
    field = torch.arange(strokes * 8, device=classes.device).view(strokes, 4, 2)
    jitter = 0.06 * d * keyed.normal(classes.view(-1, 1, 1, 1), examples.view(-1, 1, 1, 1),
                                     _JITTER + field)  # (N, S, 4, 2), ~0.8 px
    start = template.start + jitter[:, :, 0]
    shape = template.shape + jitter[:, :, 1:]
    stroke = torch.arange(strokes, device=classes.device)
    at = template.at + 0.05 * d * keyed.normal(classes[:, None], examples[:, None],
                                               _JUNCTION + stroke)
    control = _controls(start, shape, template.attach, at.clamp(0, 1))  # (N, S, 4, 2)

    def u(field: int) -> Tensor:  # (N,) in [-1, 1]
        return keyed.uniform(classes, examples, _POSE + field) * 2 - 1

    angle = math.radians(15) * d * u(0)
    scale = torch.exp(0.12 * d * u(1))  # size within about +-12%
    aspect = torch.exp(0.08 * d * u(2))
    shear = 0.15 * d * u(3)
    shift = 0.1 * d * torch.stack([u(4), u(5)], -1)  # (N, 2), up to 1.4 px
    cos, sin = angle.cos(), angle.sin()
    rotation = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)
    stretch = torch.stack([torch.stack([scale * aspect, scale * shear], -1),
                           torch.stack([torch.zeros_like(scale), scale / aspect], -1)], -2)
    linear = rotation @ stretch  # (N, 2, 2)
    moved = control @ linear[:, None].transpose(-1, -2) + shift[:, None, None]
    pixels = (moved + 1) * (SIDE / 2) - 0.5  # image half-widths -> pixel centres 0..SIDE-1
    half_width = (0.9 + 0.25 * d * u(6)).clamp(0.5, 1.5)
    return pixels, half_width


def render(control: Tensor, active: Tensor, half_width: Tensor) -> Tensor:
    """Anti-aliased strokes: control (N, S, 4, 2) pixel coordinates, active (N, S),
    half_width (N,) pixels in [0, 1.5] -> images (N, 1, SIDE, SIDE) in [0, 1].

    A pixel's ink is ``clamp(half_width + 0.5 - distance, 0, 1)`` (a one-pixel linear edge)
    for its distance to the nearest curve sample: the maximum over the samples whose 4x4
    pixel neighbourhood holds it (beyond 2 pixels the ink is 0).
    """
    n, device = control.shape[0], control.device
    points = _bezier(control, torch.linspace(0, 1, SAMPLES, device=device))  # (N, S, T, 2)
    # Layout (image, ..., sample): long inner loops for the elementwise ops, and the
    # scatter below writes one image's small canvas at a time (cache-friendly).
    points = points.reshape(n, -1, 2).transpose(1, 2).contiguous()  # (N, 2, P) col, row
    # Per-sample pen half-width (+ the half-pixel edge); undrawn strokes draw no ink.
    pen = torch.where(active, half_width[:, None] + 0.5, -4.0).repeat_interleave(SAMPLES, 1)
    # Neighbourhood origins, clamped so that every neighbourhood lies in a canvas padded
    # by 2 pixels; distances still use the true sample, so in-image ink stays exact.
    origin = points.floor().clamp_(-1, SIDE - 1)  # (N, 2, P)
    offsets = torch.arange(-1, 3, device=device, dtype=points.dtype)[:, None]  # (4, 1)
    squared = (origin[:, :, None] + offsets - points[:, :, None]) ** 2  # (N, 2, 4, P)
    distance = (squared[:, 1, :, None] + squared[:, 0, None]).sqrt_()  # (N, 4, 4, P)
    ink = distance.neg_().add_(pen[:, None, None]).clamp_(0, 1)
    canvas = SIDE + 4
    corner = ((origin[:, 1] + 1) * canvas + origin[:, 0] + 1).long()  # (N, P)
    corner += torch.arange(n, device=device)[:, None] * canvas * canvas
    window = torch.arange(4, device=device)[:, None] * canvas + torch.arange(4, device=device)
    index = (corner[:, None, None] + window[..., None]).flatten()  # (N * 4 * 4 * P,)
    images = torch.zeros(n, canvas, canvas, device=device)
    images.view(-1).scatter_reduce_(0, index, ink.flatten(), "amax")
    return images[:, None, 2:-2, 2:-2].contiguous()


def glyph_images(
    seed: int, split: int, classes: int, examples: int, *, strokes: int = 4,
    distortion: float = 1.0, device: torch.device | str = "cpu",
) -> Tensor:
    """Images of classes ``0..classes-1`` of ``split``, class-major: (classes * examples,
    1, SIDE, SIDE) float32 in [0, 1].

    Class ``i`` of split ``s`` is keyed ``(seed, stream, s, i)`` (the template stream) and
    its example ``k`` ``(seed, stream, s, i, k)`` (the instance stream): the images of a
    class do not depend on ``classes`` nor ``examples`` (more examples add images), and
    splits never share a class.
    """
    device = torch.device(device)
    keys = torch.arange(classes, device=device)
    template = templates(Keyed(seed, _TEMPLATE, split, device=device), keys, strokes)
    keyed = Keyed(seed, _INSTANCE, split, device=device)
    out = torch.empty(classes * examples, 1, SIDE, SIDE, device=device)
    for begin in range(0, classes * examples, CHUNK):
        index = torch.arange(begin, min(begin + CHUNK, classes * examples), device=device)
        cls, example = index // examples, index % examples
        chunk = Templates(*(getattr(template, f.name)[cls] for f in fields(Templates)))
        control, half_width = instances(keyed, chunk, cls, example, distortion)
        out[begin:begin + len(index)] = render(control, chunk.active, half_width)
    return out
