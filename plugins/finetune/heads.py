"""The classifiers of the fine-tuning baselines: linear (Baseline) and cosine (Baseline++).

Chen et al. 2019 (arXiv:1904.04232, section 3.1) put one of two classifiers on the
features, both in the training stage (over all meta-train classes) and in the fine-tuning
stage (a new one over an episode's ways):

* ``"linear"``, Baseline: ``logits = f W^T + b``.
* ``"cosine"``, Baseline++: ``logits = s * cos(f, w_c)`` for each class vector ``w_c``,
  with the scale ``s`` of their code (``distLinear`` in CloserLookFewShot/backbone.py): 2
  for at most 200 classes, else 10. Their code also wraps the class vectors in
  ``WeightNorm``, which multiplies each class's cosine by a learnable norm ``g_c``
  (their README, issues #4 and #8); we implement the paper's plain cosine.

The functions take tensors with any leading dimensions (``features`` (..., n, d),
``weight`` (..., classes, d), ``bias`` (..., classes)), so stacked per-episode heads and
vmapped ones work alike.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

HEADS = ("linear", "cosine")
#: Norms are clamped below at this value (CloserLookFewShot adds 1e-5 to them): exact
#: cosines for any vector longer than it, bounded gradients for (dead) all-zero features.
EPS = 1e-5


def cosine_scale(classes: int) -> float:
    """The fixed scale of Baseline++'s cosine logits (``distLinear``: 2 if <= 200 classes)."""
    return 2.0 if classes <= 200 else 10.0


def logits(head: str, features: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """Class scores (..., n, classes) of ``features`` (..., n, d) for classifier ``head``."""
    if head == "cosine":
        f = F.normalize(features, dim=-1, eps=EPS)
        w = F.normalize(weight, dim=-1, eps=EPS)
        return cosine_scale(weight.shape[-2]) * (f @ w.mT)
    scores = features @ weight.mT
    return scores if bias is None else scores + bias.unsqueeze(-2)


class Classifier(nn.Module):
    """A linear or cosine classifier over ``classes`` from ``dim`` features.

    Initialised like ``nn.Linear`` (uniform in +-1/sqrt(dim), as CloserLookFewShot's
    classifiers are) from ``generator`` (default: torch's global one). The cosine
    classifier has no bias.
    """

    def __init__(self, head: str, classes: int, dim: int, *,
                 generator: torch.Generator | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"unknown head {head!r}; expected one of {HEADS}")
        self.head = head
        bound = 1 / math.sqrt(dim)

        def uniform(*shape: int) -> nn.Parameter:
            u = torch.rand(*shape, generator=generator, dtype=torch.float64)
            return nn.Parameter(((2 * u - 1) * bound).to(dtype))

        self.weight = uniform(classes, dim)  # (classes, dim)
        self.register_parameter("bias", uniform(classes) if head == "linear" else None)

    def forward(self, features: Tensor) -> Tensor:
        return logits(self.head, features, self.weight, self.bias)
