"""A tiny U-Net (Ronneberger et al., 2015) for the segmentation scenes: a dense backbone.

A dense backbone maps ``(N, C, H, W)`` images to ``(N, feature_dim, H, W)`` per-pixel features
(``dense = True``); :class:`reglab.tasks.SegmentationModule` puts a 1×1 convolution on top as the
classifier, the way :class:`~reglab.tasks.ClassificationModule` puts a linear head on a backbone's
pooled features.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reglab.models.registry import register_backbone

FUSIONS = ("concat", "add", "freqfusion")
DILATED_CONVS = ("plain", "fadc")


def _conv3x3(in_channels: int, out_channels: int) -> nn.Module:
    return nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)


def _double_conv(in_channels: int, out_channels: int, conv: Callable[[int, int], nn.Module] = _conv3x3) -> nn.Sequential:
    return nn.Sequential(
        conv(in_channels, out_channels),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
        conv(out_channels, out_channels),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
    )


class LateralFusion(nn.Module):
    """FPN-style fusion of a decoder's coarse feature ``lr`` into the skip feature ``hr`` (2× its size).

    A 1×1 convolution brings ``lr`` to ``hr``'s channels (FPN's lateral alignment), then either
    plain upsample-and-add, ``hr + bilinear_2×(lr)`` (``freqfusion=False``: the baseline, the
    bilinear resize of the SegNeXt/SegFormer heads FreqFusion is compared with), or
    ``hr' + lr'`` with ``(hr', lr')`` from :class:`reglab.nn.FreqFusion` (the official README's
    "add version for feature fusion"). The two differ only in the fusion op.

    Example:
        >>> fuse = LateralFusion(lr_channels=64, hr_channels=32)
        >>> fuse(torch.zeros(2, 32, 16, 16), torch.zeros(2, 64, 8, 8)).shape
        torch.Size([2, 32, 16, 16])
    """

    def __init__(self, lr_channels: int, hr_channels: int, freqfusion: bool = False) -> None:
        super().__init__()
        self.lateral = nn.Conv2d(lr_channels, hr_channels, 1)
        if freqfusion:
            from reglab.nn.freqfusion import FreqFusion

            self.freqfusion = FreqFusion(hr_channels, hr_channels)
        else:
            self.freqfusion = None

    def forward(self, hr: Tensor, lr: Tensor) -> Tensor:
        lr = self.lateral(lr)
        if self.freqfusion is None:
            return hr + F.interpolate(lr, size=hr.shape[-2:], mode="bilinear", align_corners=False)
        _, hr, lr = self.freqfusion(hr, lr)
        return hr + lr


class TinyUNet(nn.Module):
    """U-Net with ``len(channels) - 1`` down and as many up levels (2 each by default).

    Each level is two Conv-BN-ReLU 3×3 convolutions; down by 2×2 max pooling, up by a stride-2
    transposed convolution, concatenated with the encoder's features of that resolution (the skip
    connection). Height and width must be divisible by ``2 ** (len(channels) - 1)``.

    Two options swap in the dense-prediction modules of issue 18 (the rest of the network stays):

    * ``fusion``: how a decoder level merges the coarser feature into the skip — ``concat`` (the
      U-Net's, above), ``add`` (:class:`LateralFusion`: 1×1 lateral convolution, bilinear
      upsample-and-add) or ``freqfusion`` (the same with :class:`reglab.nn.FreqFusion` in place
      of the upsample); after ``add``/``freqfusion`` the level's block reads ``channels[i]``.
    * ``bottleneck_dilation`` and ``dilated_conv``: the bottleneck's two 3×3 convolutions become
      dilated ones of that rate, ``plain`` (``nn.Conv2d(dilation=d)``) or ``fadc``
      (:class:`reglab.nn.FrequencyAdaptiveDilatedConv` starting at rate ``d``). FADC's FreqSelect
      bands are the official [2, 4, 8] cut to the divisors that leave a non-empty spectrum window
      on the bottleneck's map (at most half its side: [2, 4] on the 8×8 bottleneck of 32×32 scenes).

    Args:
        input_shape: ``(channels, height, width)``.
        channels: widths from the first level to the bottleneck; the default (16, 32, 64) has
            about 117k parameters.
        fusion: ``concat`` (default), ``add`` or ``freqfusion``.
        bottleneck_dilation: dilation rate of the bottleneck's convolutions (1: not dilated).
        dilated_conv: ``plain`` (default) or ``fadc``.

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

    def __init__(
        self,
        input_shape: Sequence[int],
        channels: Sequence[int] = (16, 32, 64),
        fusion: str = "concat",
        bottleneck_dilation: int = 1,
        dilated_conv: str = "plain",
    ) -> None:
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
        if fusion not in FUSIONS or dilated_conv not in DILATED_CONVS or bottleneck_dilation < 1:
            raise ValueError(
                f"TinyUNet: fusion={fusion!r}, dilated_conv={dilated_conv!r}, bottleneck_dilation={bottleneck_dilation}."
                f" Fix: fusion is one of {FUSIONS}, dilated_conv one of {DILATED_CONVS}, bottleneck_dilation >= 1."
            )
        widths = [input_shape[0], *channels]
        bottleneck_side = min(input_shape[1:]) // factor
        bottleneck_conv = _bottleneck_conv(dilated_conv, bottleneck_dilation, bottleneck_side)
        self.down = nn.ModuleList(
            _double_conv(widths[i], widths[i + 1], bottleneck_conv if i == len(channels) - 1 else _conv3x3)
            for i in range(len(channels))
        )
        self.pool = nn.MaxPool2d(2)
        levels = list(reversed(range(len(channels) - 1)))
        if fusion == "concat":
            self.upsample = nn.ModuleList(nn.ConvTranspose2d(channels[i + 1], channels[i], 2, stride=2) for i in levels)
        else:
            self.fuse = nn.ModuleList(LateralFusion(channels[i + 1], channels[i], fusion == "freqfusion") for i in levels)
        width = 2 if fusion == "concat" else 1
        self.up = nn.ModuleList(_double_conv(width * channels[i], channels[i]) for i in levels)
        self.fusion = fusion
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
        for level, block in enumerate(self.up):
            skip = skips.pop()
            if self.fusion == "concat":
                x = block(torch.cat([skip, self.upsample[level](x)], dim=1))
            else:
                x = block(self.fuse[level](skip, x))
        return x, bottleneck

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_with_bottleneck(x)[0]


def _bottleneck_conv(kind: str, dilation: int, side: int) -> Callable[[int, int], nn.Module]:
    if kind == "fadc":
        from reglab.nn.fadc import FrequencyAdaptiveDilatedConv

        k_list = [k for k in (2, 4, 8) if 2 * k <= side]
        if not k_list:
            raise ValueError(f"TinyUNet: the bottleneck is {side} pixels wide, too small for FADC's FreqSelect. Fix: use larger inputs.")
        return lambda i, o: FrequencyAdaptiveDilatedConv(i, o, dilation=dilation, bias=False, k_list=k_list)
    if dilation == 1:
        return _conv3x3
    return lambda i, o: nn.Conv2d(i, o, 3, padding=dilation, dilation=dilation, bias=False)


register_backbone("unet")(TinyUNet)
