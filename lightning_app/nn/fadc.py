"""FADC: frequency-adaptive dilated convolution (Chen et al., CVPR 2024).

Follows the official code (github.com/Linwei-Chen/FADC, ``FADC_only/conv_custom.py``,
``AdaptiveDilatedConv`` with the settings of ``configs/FADC/upernet_R50_FADC_512_160k_ade20k.py``:
one deformable group, replicate padding, ``kernel_decompose='both'``, ``pre_fs=True``,
``conv_type='conv'``, FreqSelect with ``lp_type='freq'``, sigmoid, one spatial group, no low-band
attention). A 3×3 convolution whose three parts each address one phase of dilated convolution:

* **FreqSelect** (:class:`FrequencySelection`), before the convolution: the input is split by
  centred square masks of its 2-D spectrum into bands (``k_list`` [2, 4, 8]: the window of side
  ``H/k`` is the part below ``1/k`` of the band; the bands are what lies between successive
  windows, the last window the lowest band) and each band but the lowest is reweighted per pixel
  by ``2·sigmoid(conv3×3(x))`` (zero-initialized: the identity at start). It learns to suppress
  high frequencies (e.g. in background), which lets AdaDR choose larger dilations there;
* **AdaDR** (adaptive dilation rate): a 3×3 convolution predicts one non-negative value ``D(p)``
  per pixel, and the kernel's taps are sampled at ``p + (1 + D(p))·(i, j)``, ``(i, j)`` the 3×3
  grid — a deformable convolution (torchvision's ``deform_conv2d``, mmcv's in the official code)
  whose offsets are the grid scaled by ``D``; modulated by a per-tap mask ``sigmoid(conv3×3(x))``
  (zero-initialized: 0.5). ``D`` starts at ``dilation - 1 + epsilon·dilation``: the plain dilated
  convolution of rate ``dilation``;
* **AdaKern** (adaptive kernel): the weight is split into its per-filter mean over the taps (the
  low-frequency, DC part) and the rest (high frequency); each part is scaled per sample by
  ``2·sigmoid`` channel (input) and filter (output) attentions computed from the pooled input
  (two small SE-like branches, official ``OmniAttention`` with kernel_size 1, kernel_num 1).

Written by hand (no library has it) except the deformable sampling, which is torchvision's. Only
3×3 kernels, stride 1 and one group, as the official layer (its kernel reshape is fixed at 3×3).
The FFT and the deformable convolution run in fp32 (neither has a bf16 CPU kernel).

Example:
    >>> import torch
    >>> conv = FrequencyAdaptiveDilatedConv(16, 32, dilation=2, k_list=(2, 4))
    >>> conv(torch.randn(2, 16, 8, 8)).shape
    torch.Size([2, 32, 8, 8])
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import deform_conv2d

#: (dy, dx) of each tap of a 3×3 kernel, row-major: the offsets AdaDR scales by D(p)
_GRID = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 0), (0, 1), (1, -1), (1, 0), (1, 1))


def band_windows(size: int, k_list: Sequence[int]) -> list[tuple[int, int]]:
    """``[start, stop)`` of the centred (``fftshift``-ed) spectrum window of each ``k`` along an
    axis of ``size`` (the official rounding: ``round(size/2 ∓ size/(2k))``).

    Example:
        >>> band_windows(8, [2, 4])
        [(2, 6), (3, 5)]
    """
    return [(round(size / 2 - size / (2 * k)), round(size / 2 + size / (2 * k))) for k in k_list]


class FrequencySelection(nn.Module):
    """FreqSelect: ``x = Σ_b w_b(x) ⊙ band_b(x) + lowest(x)``, bands from centred spectrum masks.

    ``band_b = low_{b-1} - low_b`` with ``low_0 = x`` and ``low_b`` the inverse FFT of the
    spectrum inside window ``b`` (:func:`band_windows`); ``w_b = 2·sigmoid(conv3×3_b(x))`` one
    weight per pixel (shared by all channels), its convolution zero-initialized so the module
    starts as the identity.

    Example:
        >>> fs = FrequencySelection(4, k_list=(2,))
        >>> x = torch.randn(1, 4, 8, 8)
        >>> torch.allclose(fs(x), x, atol=1e-5)
        True
    """

    def __init__(self, in_channels: int, k_list: Sequence[int] = (2, 4, 8), kernel_size: int = 3) -> None:
        super().__init__()
        if not k_list or any(int(k) < 1 for k in k_list):
            raise ValueError(f"FrequencySelection: k_list must be positive band divisors, got {list(k_list)}. Fix: e.g. [2, 4].")
        self.k_list = [int(k) for k in k_list]
        self.weights = nn.ModuleList(
            nn.Conv2d(in_channels, 1, kernel_size, padding=kernel_size // 2) for _ in self.k_list
        )
        for conv in self.weights:
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        rows, cols = band_windows(h, self.k_list), band_windows(w, self.k_list)
        if any(a == b for a, b in rows + cols):
            raise ValueError(
                f"FrequencySelection: k_list {self.k_list} leaves an empty spectrum window on a {h}×{w} map."
                f" Fix: use divisors at most half the map's side (e.g. k_list: [2, 4] for 8×8)."
            )
        spectrum = torch.fft.fftshift(torch.fft.fft2(x.float(), norm="ortho"), dim=(-2, -1))
        out = torch.zeros_like(x)
        previous = x.float()
        for (r0, r1), (c0, c1), conv in zip(rows, cols, self.weights):
            window = torch.zeros(h, w, device=x.device)
            window[r0:r1, c0:c1] = 1.0
            low = torch.fft.ifft2(torch.fft.ifftshift(spectrum * window, dim=(-2, -1)), norm="ortho").real
            out = out + (2 * torch.sigmoid(conv(x)) * (previous - low)).to(x.dtype)
            previous = low
        return out + previous.to(x.dtype)


class _KernelAttention(nn.Module):
    """Per-sample input-channel and output-filter attentions in (0, 1) from the pooled input
    (official ``OmniAttention`` with kernel_size 1 and kernel_num 1: no spatial or kernel branch)."""

    def __init__(self, in_channels: int, out_channels: int, reduction: float = 0.0625, min_channels: int = 16) -> None:
        super().__init__()
        hidden = max(int(in_channels * reduction), min_channels)
        self.fc = nn.Sequential(nn.Conv2d(in_channels, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU())
        self.channel_fc = nn.Conv2d(hidden, in_channels, 1)
        self.filter_fc = nn.Conv2d(hidden, out_channels, 1)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        pooled = self.fc(x.mean(dim=(-2, -1), keepdim=True))
        return torch.sigmoid(self.channel_fc(pooled)).flatten(1), torch.sigmoid(self.filter_fc(pooled)).flatten(1)


class FrequencyAdaptiveDilatedConv(nn.Module):
    """A 3×3 convolution with per-pixel adaptive dilation, adaptive kernel and frequency selection.

    Replaces ``nn.Conv2d(in_channels, out_channels, 3, padding=dilation, dilation=dilation)``
    (same input and output shapes). See the module docstring for the three parts and sources.

    Args:
        in_channels, out_channels: as ``nn.Conv2d``.
        dilation: the starting dilation rate (the one of the plain dilated convolution replaced).
        bias: a learned bias per output channel.
        epsilon: added to the starting ``D / dilation`` (official 1e-4, keeps ``|D|`` off its kink).
        k_list: FreqSelect's band divisors; the official [2, 4, 8] is for maps of 16 pixels and
            more, [2, 4] suits 8×8 maps. ``None``: no FreqSelect.
        adaptive_kernel: AdaKern on (official ``kernel_decompose='both'``); off: one static weight.

    Example:
        >>> conv = FrequencyAdaptiveDilatedConv(8, 8, dilation=2, k_list=(2, 4))
        >>> conv(torch.randn(2, 8, 16, 16)).shape
        torch.Size([2, 8, 16, 16])
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        dilation: int = 1,
        bias: bool = True,
        epsilon: float = 1e-4,
        k_list: Sequence[int] | None = (2, 4, 8),
        adaptive_kernel: bool = True,
    ) -> None:
        super().__init__()
        if dilation < 1:
            raise ValueError(f"FrequencyAdaptiveDilatedConv: dilation must be at least 1, got {dilation}. Fix: pass dilation >= 1.")
        self.in_channels, self.out_channels, self.dilation = in_channels, out_channels, dilation
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, 3, 3))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        # mmcv's ModulatedDeformConv2d init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), bias 0
        bound = 1 / math.sqrt(in_channels * 9)
        nn.init.uniform_(self.weight, -bound, bound)
        self.pad = nn.ReplicationPad2d(1)
        self.conv_offset = nn.Conv2d(in_channels, 1, 3)
        nn.init.zeros_(self.conv_offset.weight)
        nn.init.constant_(self.conv_offset.bias, (dilation - 1) / dilation + epsilon)
        self.conv_mask = nn.Conv2d(in_channels, 9, 3)
        nn.init.zeros_(self.conv_mask.weight)
        nn.init.zeros_(self.conv_mask.bias)
        self.register_buffer("grid", torch.tensor(_GRID, dtype=torch.float32).flatten().view(1, 18, 1, 1), persistent=False)
        self.freq_select = FrequencySelection(in_channels, k_list) if k_list is not None else None
        self.low_attention = _KernelAttention(in_channels, out_channels) if adaptive_kernel else None
        self.high_attention = _KernelAttention(in_channels, out_channels) if adaptive_kernel else None

    def dilation_map(self, x: Tensor) -> Tensor:
        """``D(p)`` (N, 1, H, W) for an input already through FreqSelect: taps at ``p + (1 + D)·(i, j)``."""
        return self.conv_offset(self.pad(x)).abs() * self.dilation

    def forward(self, x: Tensor) -> Tensor:
        if self.freq_select is not None:
            x = self.freq_select(x)
        n, _, h, w = x.shape
        offset = self.dilation_map(x) * self.grid  # (N, 18, H, W): (dy, dx) per tap, torchvision's order
        padded = self.pad(x)
        mask = torch.sigmoid(self.conv_mask(padded))
        if self.low_attention is None:
            weight, bias = self.weight, self.bias
        else:
            c_low, f_low = self.low_attention(x)
            c_high, f_high = self.high_attention(x)
            mean = self.weight.mean(dim=(-2, -1), keepdim=True)
            # (N, out, in, 3, 3): DC and high-frequency parts each scaled by 2·input x 2·output attention
            weight = mean * (4 * c_low[:, None, :, None, None] * f_low[:, :, None, None, None]) + (self.weight - mean) * (
                4 * c_high[:, None, :, None, None] * f_high[:, :, None, None, None]
            )
            # one sample per group (torchvision infers groups from the shapes): the official trick
            weight = weight.reshape(n * self.out_channels, self.in_channels, 3, 3)
            bias = None if self.bias is None else self.bias.repeat(n)
            padded = padded.reshape(1, n * self.in_channels, h + 2, w + 2)
            offset, mask = offset.reshape(1, n * 18, h, w), mask.reshape(1, n * 9, h, w)
        out = deform_conv2d(
            padded.float(), offset.float(), weight.float(), None if bias is None else bias.float(), mask=mask.float()
        )
        return out.reshape(n, self.out_channels, h, w).to(x.dtype)


def dilation_stats(model: nn.Module, datamodule: object) -> dict[str, float]:
    """Mean and max of the learnt ``D`` (taps at ``(1 + D)·(i, j)``) over the first test batch, all
    pixels and every :class:`FrequencyAdaptiveDilatedConv` of ``model``; ``{}`` when it has none.
    A plain dilated convolution of rate ``d`` is ``D = d - 1`` everywhere, so a runaway (``D`` far
    above it, taps beyond the map) shows here. The ``fit`` claims protocol measures it after each
    run's test when a claim names it in ``measures``.

    Example:
        >>> from types import SimpleNamespace
        >>> net = nn.Sequential(FrequencyAdaptiveDilatedConv(1, 4, dilation=2, k_list=None))
        >>> data = SimpleNamespace(test_dataloader=lambda: [{"input": torch.zeros(2, 1, 8, 8)}])
        >>> {k: round(v, 3) for k, v in dilation_stats(net, data).items()}
        {'fadc/dilation_mean': 1.0, 'fadc/dilation_max': 1.0}
    """
    layers = [m for m in model.modules() if isinstance(m, FrequencyAdaptiveDilatedConv)]
    if not layers:
        return {}
    maps: list[Tensor] = []
    hooks = [layer.conv_offset.register_forward_hook(
        lambda _module, _inputs, out, d=layer.dilation: maps.append(out.abs().flatten() * d)) for layer in layers]
    batch = next(iter(datamodule.test_dataloader()))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(batch["input"].to(device))
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    values = torch.cat(maps)
    return {"fadc/dilation_mean": values.mean().item(), "fadc/dilation_max": values.max().item()}
