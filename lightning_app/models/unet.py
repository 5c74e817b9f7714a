"""A tiny U-Net (Ronneberger et al., 2015) for the segmentation scenes: a dense backbone.

A dense backbone maps ``(N, C, H, W)`` images to ``(N, feature_dim, H, W)`` per-pixel features
(``dense = True``); :class:`reglab.tasks.SegmentationModule` puts a 1×1 convolution on top as the
classifier, the way :class:`~reglab.tasks.ClassificationModule` puts a linear head on a backbone's
pooled features.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from reglab.models.registry import register_backbone


def _double_conv(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
        nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
    )


class TinyUNet(nn.Module):
    """U-Net with ``len(channels) - 1`` down and as many up levels (2 each by default).

    Each level is two Conv-BN-ReLU 3×3 convolutions; down by 2×2 max pooling, up by a stride-2
    transposed convolution, concatenated with the encoder's features of that resolution (the skip
    connection). Height and width must be divisible by ``2 ** (len(channels) - 1)``.

    Args:
        input_shape: ``(channels, height, width)``.
        channels: widths from the first level to the bottleneck; the default (16, 32, 64) has
            about 117k parameters.

    Attributes:
        feature_dim: width of the output features (``channels[0]``).
        bottleneck_dim: width of the bottleneck (``channels[-1]``).

    Example:
        >>> net = TinyUNet((1, 32, 32))
        >>> features, bottleneck = net.forward_with_bottleneck(torch.zeros(2, 1, 32, 32))
        >>> tuple(features.shape), tuple(bottleneck.shape)
        ((2, 16, 32, 32), (2, 64, 8, 8))
    """

    dense = True

    def __init__(self, input_shape: Sequence[int], channels: Sequence[int] = (16, 32, 64)) -> None:
        super().__init__()
        if len(input_shape) != 3:
            raise ValueError(f"TinyUNet needs (channels, height, width) inputs, got shape {tuple(input_shape)}")
        if len(channels) < 2:
            raise ValueError(f"TinyUNet needs at least two levels of channels, got {tuple(channels)}")
        factor = 2 ** (len(channels) - 1)
        if input_shape[1] % factor or input_shape[2] % factor:
            raise ValueError(
                f"TinyUNet with {len(channels) - 1} down levels needs height and width divisible by {factor},"
                f" got {tuple(input_shape[1:])}; pad the images or use fewer channels levels."
            )
        widths = [input_shape[0], *channels]
        self.down = nn.ModuleList(_double_conv(widths[i], widths[i + 1]) for i in range(len(channels)))
        self.pool = nn.MaxPool2d(2)
        self.upsample = nn.ModuleList(
            nn.ConvTranspose2d(channels[i + 1], channels[i], 2, stride=2) for i in reversed(range(len(channels) - 1))
        )
        self.up = nn.ModuleList(_double_conv(2 * channels[i], channels[i]) for i in reversed(range(len(channels) - 1)))
        self.feature_dim = channels[0]
        self.bottleneck_dim = channels[-1]

    def forward_with_bottleneck(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(per-pixel features (N, feature_dim, H, W), bottleneck (N, bottleneck_dim, H/f, W/f))``."""
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else self.pool(x))
            skips.append(x)
        bottleneck = skips.pop()
        x = bottleneck
        for upsample, block in zip(self.upsample, self.up):
            x = block(torch.cat([skips.pop(), upsample(x)], dim=1))
        return x, bottleneck

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_with_bottleneck(x)[0]


register_backbone("unet")(TinyUNet)
