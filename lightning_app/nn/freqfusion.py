"""FreqFusion: frequency-aware fusion of a decoder's coarse and fine features (Chen et al., TPAMI 2024).

Follows the official code (github.com/Linwei-Chen/FreqFusion, ``FreqFusion.py``, the path its
segmentation heads take: ``semi_conv`` and ``comp_feat_upsample`` on, the offset generator on,
no Hamming window, as in ``SegNeXt/local_configs/segnext/tiny/segnext.tiny.freqfusion.*.py``).
Given a high-resolution feature ``hr`` (N, C_hr, 2H, 2W) and a low-resolution one ``lr``
(N, C_lr, H, W), it returns ``lr`` upsampled 2× by three learned, content-dependent steps and
``hr`` with its detail sharpened, which the decoder then adds (or concatenates):

* **ALPF** (adaptive low-pass filter): a per-pixel 5×5 kernel, softmax-normalized (so a
  low-pass: non-negative weights summing to 1), predicted from both inputs, smooths ``lr`` while
  upsampling it (CARAFE reassembly; each output pixel of a 2×2 block reads the 5×5 neighbourhood
  of its low-resolution parent);
* **offset generator**: resamples the upsampled ``lr`` at positions moved towards neighbours of
  similar content (offsets from the features and their local cosine similarities), replacing
  inconsistent features inside objects and at thin boundaries;
* **AHPF** (adaptive high-pass filter): ``hr + (hr - lowpass_3×3(hr))`` adds back the detail a
  per-pixel 3×3 low-pass removes, i.e. the high frequencies lost in downsampling.

CARAFE is written here in plain torch (``F.unfold``) with mmcv's semantics: zero padding outside
the feature map (mmcv's kernel skips out-of-range taps; the official code's own fallback pads by
reflection), kernels not renormalized at borders. Like the official code, ``init_weights`` draws
every convolution Xavier-uniform — including the offset generator's, whose own near-zero init the
official ``FreqFusion.init_weights`` overwrites — and then the two kernel encoders N(0, 0.001).

Example:
    >>> import torch
    >>> fusion = FreqFusion(hr_channels=16, lr_channels=16)
    >>> kernels, hr, lr_up = fusion(torch.randn(2, 16, 16, 16), torch.randn(2, 16, 8, 8))
    >>> tuple(hr.shape), tuple(lr_up.shape), tuple(kernels.shape)
    ((2, 16, 16, 16), (2, 16, 16, 16), (2, 25, 16, 16))
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn


def carafe(x: Tensor, kernels: Tensor, kernel_size: int, scale: int) -> Tensor:
    """Content-aware reassembly (CARAFE, Wang et al. 2019) of ``x`` (N, C, h, w) by per-pixel
    ``kernels`` (N, k², s·h, s·w): output pixel ``(i, j)`` is the ``k×k`` neighbourhood of input
    pixel ``(i // s, j // s)`` weighted by that pixel's kernel (row-major taps), zeros outside ``x``.

    Example (a 3×3 box filter on a 2×2 map: each output sums the whole map and divides by 9):
        >>> x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
        >>> carafe(x, torch.full((1, 9, 2, 2), 1 / 9), kernel_size=3, scale=1)
        tensor([[[[1.1111, 1.1111],
                  [1.1111, 1.1111]]]])
    """
    n, c, h, w = x.shape
    taps = kernel_size**2
    # one small matmul per low-resolution pixel: (C, k²) neighbourhood @ (k², s²) kernels of its s×s children
    patches = F.unfold(x, kernel_size, padding=kernel_size // 2).view(n, c, taps, h * w).permute(0, 3, 1, 2)
    kernels = kernels.to(x.dtype).reshape(n, taps, h, scale, w, scale).permute(0, 2, 4, 1, 3, 5)
    out = patches @ kernels.reshape(n, h * w, taps, scale * scale)
    return out.view(n, h, w, c, scale, scale).permute(0, 3, 1, 4, 2, 5).reshape(n, c, h * scale, w * scale)


def normalize_kernels(logits: Tensor, window: Tensor | None = None) -> Tensor:
    """Per-pixel kernels (N, k², H, W) from logits: softmax over the taps, optionally times a
    window (k²,) and renormalized to sum 1 (the official ``kernel_normalizer``, one group)."""
    kernels = logits.softmax(dim=1)
    if window is None:
        return kernels
    kernels = kernels * window.view(1, -1, 1, 1)
    return kernels / kernels.sum(dim=1, keepdim=True)


def local_similarity(x: Tensor, window: int = 3, dilation: int = 2) -> Tensor:
    """Cosine similarity (N, window² - 1, H, W) of each pixel's feature vector with its
    ``window×window`` neighbours at ``dilation`` (centre left out; zero outside the map)."""
    n, c, h, w = x.shape
    unit = x / x.norm(dim=1, keepdim=True).clamp_min(1e-8)
    neighbours = F.unfold(unit, window, padding=(window // 2) * dilation, dilation=dilation).view(n, c, window**2, h, w)
    similarity = (neighbours * unit.unsqueeze(2)).sum(dim=1)
    centre = window**2 // 2
    return torch.cat([similarity[:, :centre], similarity[:, centre + 1 :]], dim=1)


def _hamming_2d(size: int) -> Tensor:
    return torch.from_numpy(np.outer(np.hamming(size), np.hamming(size))).float().flatten()


class _OffsetResampler(nn.Module):
    """The offset generator (official ``LocalSimGuidedSampler``: scale 2, style ``lp``,
    ``direction_feat='sim_concat'``, direct scale on, GroupNorm on its inputs).

    Offsets (in low-resolution pixels, per group of channels and per sub-pixel of each 2×2 block)
    are ``(offset(lr) + unshuffle(hr_offset(hr))) · sigmoid(scale(lr) + unshuffle(hr_scale(hr)))``
    plus each sub-pixel's own position (±0.25), read from the features concatenated with their
    local similarities; the upsampled feature is then sampled bilinearly there (border padding).
    With all convolutions zero the offsets are the sub-pixel positions and the sampling is the
    identity.
    """

    def __init__(self, channels: int, groups: int, kernel_size: int, window: int = 3) -> None:
        super().__init__()
        if channels < 8 or channels % groups:
            raise ValueError(
                f"FreqFusion: the offset generator needs at least 8 compressed channels divisible by"
                f" resample_groups={groups}, got {channels}. Fix: raise compressed_channels or lower resample_groups."
            )
        self.groups = groups
        inputs = channels + window**2 - 1
        pad = kernel_size // 2
        self.offset = nn.Conv2d(inputs, 2 * groups * 4, kernel_size, padding=pad)
        self.direct_scale = nn.Conv2d(inputs, 2 * groups * 4, kernel_size, padding=pad)
        self.hr_offset = nn.Conv2d(inputs, 2 * groups, kernel_size, padding=pad)
        self.hr_direct_scale = nn.Conv2d(inputs, 2 * groups, kernel_size, padding=pad)
        self.norm_hr = nn.GroupNorm(channels // 8, channels)
        self.norm_lr = nn.GroupNorm(channels // 8, channels)
        self.window = window
        steps = torch.tensor([-0.25, 0.25])  # sub-pixel centres of a 2×2 block, in low-resolution pixels
        grid = torch.stack(torch.meshgrid(steps, steps, indexing="ij")).transpose(1, 2)
        self.register_buffer("init_pos", grid.repeat(1, groups, 1).reshape(1, -1, 1, 1), persistent=False)

    def forward(self, hr_x: Tensor, lr_x: Tensor, features: Tensor) -> Tensor:
        hr_x, lr_x = self.norm_hr(hr_x), self.norm_lr(lr_x)
        hr_x = torch.cat([hr_x, local_similarity(hr_x, self.window)], dim=1)
        lr_x = torch.cat([lr_x, local_similarity(lr_x, self.window)], dim=1)
        offset = (self.offset(lr_x) + F.pixel_unshuffle(self.hr_offset(hr_x), 2)) * (
            self.direct_scale(lr_x) + F.pixel_unshuffle(self.hr_direct_scale(hr_x), 2)
        ).sigmoid() + self.init_pos
        return self._sample(features, offset)

    def _sample(self, x: Tensor, offset: Tensor) -> Tensor:
        n, _, h, w = offset.shape
        offset = offset.view(n, 2, -1, h, w)
        ys = torch.arange(h, device=x.device, dtype=offset.dtype) + 0.5
        xs = torch.arange(w, device=x.device, dtype=offset.dtype) + 0.5
        coords = torch.stack(torch.meshgrid(xs, ys, indexing="ij")).transpose(1, 2).view(1, 2, 1, h, w)
        size = torch.tensor([w, h], device=x.device, dtype=offset.dtype).view(1, 2, 1, 1, 1)
        coords = 2 * (coords + offset) / size - 1
        coords = F.pixel_shuffle(coords.reshape(n, -1, h, w), 2).view(n, 2, -1, 2 * h, 2 * w)
        coords = coords.permute(0, 2, 3, 4, 1).flatten(0, 1)
        grouped = x.reshape(n * self.groups, -1, x.shape[-2], x.shape[-1])
        sampled = F.grid_sample(grouped, coords.to(x.dtype), mode="bilinear", padding_mode="border", align_corners=False)
        return sampled.view(n, -1, 2 * h, 2 * w)


class FreqFusion(nn.Module):
    """Frequency-aware feature fusion of ``hr`` (N, C_hr, 2H, 2W) and ``lr`` (N, C_lr, H, W).

    ``forward(hr, lr)`` returns ``(kernels, hr_sharpened, lr_upsampled)`` as the official module
    does: the ALPF's per-pixel 5×5 low-pass kernels (N, 25, 2H, 2W), ``hr`` after the AHPF
    (C_hr channels) and ``lr`` upsampled 2× by the ALPF then resampled by the offset generator
    (C_lr channels, at ``hr``'s size); a decoder adds the last two (same channels) or concatenates
    them. See the module docstring for the three parts and the sources.

    Args:
        hr_channels, lr_channels: channels of the two inputs.
        lowpass_kernel, highpass_kernel: kernel sizes of the ALPF (5) and the AHPF (3).
        encoder_kernel: kernel size of the convolutions predicting the kernels and the offsets (3).
        compressed_channels: width both inputs are compressed to (1×1 convolutions) before the
            kernels and offsets are predicted; default ``(hr_channels + lr_channels) // 4``, the
            official segmentation heads' ``compress_ratio`` 4 (SegNeXt-T).
        feature_resample: use the offset generator (on in the official segmentation configs).
        resample_groups: channel groups of the offset generator, each with its own offsets (4).
        hamming_window: multiply the kernels by a 2-D Hamming window (the class's default in the
            official code, off in its segmentation configs, which reglab follows).

    Example:
        >>> fusion = FreqFusion(hr_channels=32, lr_channels=64)
        >>> _, hr, lr_up = fusion(torch.randn(1, 32, 16, 16), torch.randn(1, 64, 8, 8))
        >>> tuple(hr.shape), tuple(lr_up.shape)
        ((1, 32, 16, 16), (1, 64, 16, 16))
    """

    def __init__(
        self,
        hr_channels: int,
        lr_channels: int,
        lowpass_kernel: int = 5,
        highpass_kernel: int = 3,
        encoder_kernel: int = 3,
        compressed_channels: int | None = None,
        feature_resample: bool = True,
        resample_groups: int = 4,
        hamming_window: bool = False,
    ) -> None:
        super().__init__()
        if lowpass_kernel % 2 == 0 or highpass_kernel % 2 == 0:
            raise ValueError(
                f"FreqFusion: kernel sizes must be odd (centred), got lowpass_kernel={lowpass_kernel},"
                f" highpass_kernel={highpass_kernel}. Fix: use e.g. 5 and 3."
            )
        compressed = compressed_channels or (hr_channels + lr_channels) // 4
        if feature_resample and lr_channels % resample_groups:
            raise ValueError(
                f"FreqFusion: lr_channels={lr_channels} is not divisible by resample_groups={resample_groups}."
                " Fix: choose resample_groups dividing lr_channels."
            )
        self.lowpass_kernel, self.highpass_kernel = lowpass_kernel, highpass_kernel
        self.hr_channel_compressor = nn.Conv2d(hr_channels, compressed, 1)
        self.lr_channel_compressor = nn.Conv2d(lr_channels, compressed, 1)
        pad = encoder_kernel // 2
        self.content_encoder = nn.Conv2d(compressed, lowpass_kernel**2, encoder_kernel, padding=pad)  # ALPF
        self.content_encoder2 = nn.Conv2d(compressed, highpass_kernel**2, encoder_kernel, padding=pad)  # AHPF
        self.resampler = _OffsetResampler(compressed, resample_groups, encoder_kernel) if feature_resample else None
        for name, size in (("lowpass_window", lowpass_kernel), ("highpass_window", highpass_kernel)):
            self.register_buffer(name, _hamming_2d(size) if hamming_window else None, persistent=False)
        self.init_weights()

    def init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        for encoder in (self.content_encoder, self.content_encoder2):
            nn.init.normal_(encoder.weight, std=0.001)

    def _lowpass(self, logits: Tensor) -> Tensor:
        return normalize_kernels(logits, self.lowpass_window)

    def _highpass(self, logits: Tensor) -> Tensor:
        return normalize_kernels(logits, self.highpass_window)

    def forward(self, hr: Tensor, lr: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if hr.shape[-2:] != tuple(2 * s for s in lr.shape[-2:]):
            raise ValueError(
                f"FreqFusion: hr must be twice lr's size, got hr {tuple(hr.shape[-2:])} and lr {tuple(lr.shape[-2:])}."
                " Fix: fuse neighbouring levels of a stride-2 pyramid."
            )
        lp, hp = self.lowpass_kernel, self.highpass_kernel
        hr_c, lr_c = self.hr_channel_compressor(hr), self.lr_channel_compressor(lr)
        # initial AHPF sharpens the compressed hr before the ALPF is predicted from it (comp_feat_upsample)
        hr_hp_logits = self.content_encoder2(hr_c)
        hr_c = 2 * hr_c - carafe(hr_c, self._highpass(hr_hp_logits), hp, 1)
        # ALPF logits: from hr, plus lr's logits upsampled by an initial ALPF (semi_conv)
        lp_logits = self.content_encoder(hr_c)
        lp_logits = lp_logits + carafe(self.content_encoder(lr_c), self._lowpass(lp_logits), lp, 2)
        lowpass = self._lowpass(lp_logits)
        hp_logits = hr_hp_logits + carafe(self.content_encoder2(lr_c), lowpass, lp, 2)
        lr_up = carafe(lr, lowpass, lp, 2)
        hr = 2 * hr - carafe(hr, self._highpass(hp_logits), hp, 1)  # hr + its high-pass part (hr_residual)
        if self.resampler is not None:
            lr_up = self.resampler(hr_c, lr_c, lr_up)
        return lowpass, hr, lr_up
