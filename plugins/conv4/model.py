"""Conv-4: the standard few-shot backbone (Vinyals et al. 2016; Finn et al. 2017).

Four blocks of 3x3 convolution, BatchNorm, ReLU and 2x2 max-pooling, then a linear head.
BatchNorm keeps no running statistics (``track_running_stats=False``): it always normalises
with the statistics of the batch at hand, i.e. of each task's own support or query set,
which is what per-task adaptation (and vmap over tasks) needs. Pooling stops once the
feature map is 1x1, so small inputs (8x8 digits) work too.
"""

from __future__ import annotations

from torch import nn

from autometa import Backbone, Categorical, SourceModel, TaskSpec


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
                nn.Conv2d(in_channels, self.channels, 3, padding=1),
                nn.BatchNorm2d(self.channels, track_running_stats=False),
                nn.ReLU(),
            ]
            if min(height, width) >= 2:
                blocks.append(nn.MaxPool2d(2))
                height, width = height // 2, width // 2
            in_channels = self.channels
        blocks.append(nn.Flatten())
        features = self.channels * height * width
        return Backbone(nn.Sequential(*blocks), nn.Linear(features, spec.output_size))
