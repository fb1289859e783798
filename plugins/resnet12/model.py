"""ResNet-12: the standard few-shot backbone (Oreshkin et al. 2018; Lee et al. 2019).

Four residual blocks; each is three 3x3 convolutions with BatchNorm (LeakyReLU 0.1 between
them), a 1x1 convolution + BatchNorm shortcut, LeakyReLU after the sum, and 2x2 max-pooling.
Global average pooling turns the last feature map into the features; a linear head follows.
Widths are (64, 160, 320, 640) in MetaOptNet (Lee et al. 2019) and (64, 128, 256, 512) in
TADAM (Oreshkin et al. 2018). DropBlock, used by MetaOptNet, is left out.

As in conv4, BatchNorm keeps no running statistics: it normalises with the statistics of
the batch at hand (each task's own support or query set), which per-task adaptation and
vmap over tasks need. Pooling stops at 1x1, so 8x8 digits work as well as 84x84 images.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from autometa import Backbone, Categorical, ConfigError, SourceModel, TaskSpec

#: Block widths by name: MetaOptNet's (the usual one) and TADAM's.
METAOPTNET = "64-160-320-640"
TADAM = "64-128-256-512"


def parse_channels(channels: str | Sequence[int]) -> tuple[int, ...]:
    """``"64-160-320-640"`` (or a sequence of four ints) -> ``(64, 160, 320, 640)``."""
    try:
        parts = channels.split("-") if isinstance(channels, str) else list(channels)
        widths = tuple(int(p) for p in parts)
    except (TypeError, ValueError):
        widths = ()
    if len(widths) != 4 or min(widths) < 1:
        raise ConfigError(
            f"resnet12.channels: {channels!r} is not four positive block widths; expected "
            f"e.g. {METAOPTNET!r} (MetaOptNet) or {TADAM!r} (TADAM)"
        )
    return widths


class ResidualBlock(nn.Module):
    """3 x (conv3x3, BN) with LeakyReLU between, a 1x1 shortcut, LeakyReLU, max-pool."""

    def __init__(self, in_channels: int, out_channels: int, pool: bool) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(3):
            layers += [
                nn.Conv2d(in_channels if i == 0 else out_channels, out_channels, 3, padding=1,
                          bias=False),  # BatchNorm's shift makes a bias redundant
                nn.BatchNorm2d(out_channels, track_running_stats=False),
            ]
            if i < 2:
                layers.append(nn.LeakyReLU(0.1))
        self.body = nn.Sequential(*layers)
        self.shortcut = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels, track_running_stats=False),
        )
        self.act = nn.LeakyReLU(0.1)
        self.pool = nn.MaxPool2d(2) if pool else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:  # (n, C_in, H, W) -> (n, C_out, H/2, W/2)
        return self.pool(self.act(self.body(x) + self.shortcut(x)))


class ResNet12(SourceModel):
    input_ranks = (3,)  # (channels, height, width) images

    def __init__(self, *, channels: str | Sequence[int] = METAOPTNET) -> None:
        # Widths of the four blocks, as "64-160-320-640" (in a config file a list would
        # mean a choice of values) or, from Python, a sequence of four ints.
        self.channels = parse_channels(channels)

    @classmethod
    def search_space(cls):
        return {"channels": Categorical((METAOPTNET, TADAM))}

    @classmethod
    def incompatibility(cls, spec: TaskSpec) -> str | None:
        reason = super().incompatibility(spec)
        if reason and len(spec.input_shape) == 1:
            reason += " (flat feature vectors: use the 'mlp' source model)"
        return reason

    def build(self, spec: TaskSpec) -> Backbone:
        in_channels, height, width = spec.input_shape
        blocks: list[nn.Module] = []
        for out_channels in self.channels:
            pool = min(height, width) >= 2
            blocks.append(ResidualBlock(in_channels, out_channels, pool))
            if pool:
                height, width = height // 2, width // 2
            in_channels = out_channels
        features = nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        for m in features.modules():
            if isinstance(m, nn.Conv2d):  # as in MetaOptNet's reference implementation
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="leaky_relu")
        return Backbone(features, nn.Linear(in_channels, spec.output_size))
