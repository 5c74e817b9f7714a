"""Small backbones for the embedded data (digits, tabular, synthetic): fast on two CPU cores."""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import Tensor, nn

from reglab.models.registry import register_backbone


class MLP(nn.Module):
    """Flatten, then Linear-ReLU blocks; features are the last hidden layer.

    ``norm="batch"`` puts a BatchNorm1d between each Linear and its ReLU (what test-time
    adaptation by normalization layers, TENT and CAFA, adapts); ``None`` (default) has none.
    """

    def __init__(self, input_shape: Sequence[int], hidden_sizes: Sequence[int] = (128, 128), dropout: float = 0.0,
                 norm: str | None = None):
        super().__init__()
        if norm not in (None, "batch"):
            raise ValueError(f"MLP: norm={norm!r} is not a normalization it has. Fix: pass norm='batch' or leave it unset.")
        layers: list[nn.Module] = [nn.Flatten()]
        width = math.prod(input_shape)
        for size in hidden_sizes:
            layers += [nn.Linear(width, size), *([nn.BatchNorm1d(size)] if norm else []), nn.ReLU()]
            if dropout:
                layers.append(nn.Dropout(dropout))
            width = size
        self.layers = nn.Sequential(*layers)
        self.feature_dim = width

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


class SmallCNN(nn.Module):
    """Conv-BN-ReLU blocks (each halving the resolution after the first), global average pool."""

    def __init__(self, input_shape: Sequence[int], channels: Sequence[int] = (32, 64, 64)):
        super().__init__()
        if len(input_shape) != 3:
            raise ValueError(f"SmallCNN needs (channels, height, width) inputs, got shape {tuple(input_shape)}")
        blocks: list[nn.Module] = []
        in_channels = input_shape[0]
        for i, out_channels in enumerate(channels):
            blocks += [
                nn.Conv2d(in_channels, out_channels, 3, stride=1 if i == 0 else 2, padding=1, bias=False),
                nn.BatchNorm2d(out_channels),
                nn.ReLU(),
            ]
            in_channels = out_channels
        self.blocks = nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.feature_dim = in_channels

    def forward(self, x: Tensor) -> Tensor:
        return self.blocks(x)


register_backbone("mlp")(MLP)
register_backbone("cnn")(SmallCNN)
