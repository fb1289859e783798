"""Conv-4: the standard few-shot backbone (Vinyals et al. 2016; Finn et al. 2017).

Four blocks of 3x3 convolution, BatchNorm, ReLU and 2x2 max-pooling, then a linear head.
BatchNorm keeps no running statistics (``track_running_stats=False``): it always normalises
with the statistics of the batch at hand, i.e. of each task's own support or query set,
which is what per-task adaptation (and vmap over tasks) needs. Pooling stops once the
feature map is 1x1, so small inputs (8x8 digits) work too.

Two layout choices make a second-order MAML meta-step on a CPU faster (1.2-1.35x at 1 inner
step, 1.0-1.1x at 5; benchmarks/README.md, finding 8), with the same function and
gradients:

* each block max-pools before its ReLU: ``max`` commutes with the monotone ReLU, so the
  values are the same bit for bit, and the ReLU and its (double) backward see a quarter of
  the elements;
* on a CPU each convolution runs ``channels_last`` (NHWC), input and output: PyTorch's CPU
  max-pool is ~8x faster in that layout than in NCHW (32 ms against 4 ms for a
  75x64x28x28 query set on one thread), and oneDNN's convolutions and BatchNorm follow it.
  The layout changes which kernels run, so results agree with the NCHW model to float
  rounding, not bit for bit.

The parameter names (``0.weight``, ``1.weight``, ...) are those of the plain block, so
saved weights load either way.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from autometa import Backbone, Categorical, SourceModel, TaskSpec


def channels_last(x: Tensor) -> Tensor:
    """``x`` (N, C, H, W) in the ``channels_last`` layout, without a copy where it already is
    one in memory: a contiguous one-channel batch (grayscale images) is the same bytes in
    both layouts, but PyTorch reads its strides as NCHW, so oneDNN would return an NCHW
    output (then copied: two copies of a 75x64x28x28 query set per episode and meta-step,
    forward and backward, ~10% of a conv4 meta-step). Its strides are restated instead.

    Raises:
        RuntimeError: under ``torch.func.vmap`` (which cannot query layouts).
    """
    if x.is_contiguous(memory_format=torch.channels_last) and x.stride(1) == 1:
        return x
    if x.size(1) == 1 and x.is_contiguous():
        n, _, h, w = x.shape
        return x.as_strided(x.shape, (h * w, 1, w, 1))
    return x.contiguous(memory_format=torch.channels_last)


class ChannelsLastConv2d(nn.Conv2d):
    """``nn.Conv2d`` that runs ``channels_last`` on a CPU (module docstring): its input is
    made so (the first block's images; later blocks' inputs already are), and so is its
    output.

    Elsewhere (CUDA) and under ``torch.func.vmap`` (which cannot make that layout) it is
    the plain convolution.
    """

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type != "cpu" or x.dim() != 4:
            return super().forward(x)
        try:
            x = channels_last(x)
        except RuntimeError:  # vmap: "NYI: querying is_contiguous inside of vmap ..."
            return super().forward(x)
        return super().forward(x).contiguous(memory_format=torch.channels_last)


class Conv4(SourceModel):
    input_ranks = (3,)  # (channels, height, width) images

    def __init__(self, *, channels: int = 64) -> None:
        self.channels = channels  # filters per block

    @classmethod
    def search_space(cls):
        return {"channels": Categorical((32, 64))}

    def build(self, spec: TaskSpec) -> Backbone:
        in_channels, height, width = spec.input_shape
        blocks: list[nn.Module] = []
        for _ in range(4):
            blocks += [
                ChannelsLastConv2d(in_channels, self.channels, 3, padding=1),
                nn.BatchNorm2d(self.channels, track_running_stats=False),
            ]
            if min(height, width) >= 2:
                blocks.append(nn.MaxPool2d(2))  # before the ReLU: the same values, faster
                height, width = height // 2, width // 2
            blocks.append(nn.ReLU())
            in_channels = self.channels
        blocks.append(nn.Flatten())
        features = self.channels * height * width
        return Backbone(nn.Sequential(*blocks), nn.Linear(features, spec.output_size))
