"""Autoregressive image models over grey-level tokens: next-frequency (NFIG) and single-scale raster (PixelAR).

Both are one network, :class:`GroupedAR`: a transformer over a fixed token sequence split into
*groups*, with block-causal attention (a position sees every position of its own and earlier
groups). A group is predicted in one network evaluation, all its tokens in parallel from the earlier
groups (VAR's and NFIG's stage-parallel decoding), so sampling costs one forward per group:
:attr:`GroupedAR.network_evaluations`. The input at a position carries only earlier groups' content
(the "shift by one group" that makes a parallel group causal), plus a learned position embedding and
the class embedding (every position: VAR's class condition, which reaches every block through AdaLN).
The models differ only in what the tokens and groups are:

* :class:`NFIG` (*NFIG: Autoregressive Image Generation with Next-Frequency
  Prediction*): group ``k`` is a token map at scale ``s_k`` (default 1, 2, 4, 8 for 8x8 images):
  the first stage the lowest frequencies at the smallest scale, each later stage the band of higher
  frequencies that its scale adds. Its input at stage ``k`` is the reconstruction of stages ``< k``
  upsampled to ``s_k`` (VAR's / NFIG's interpolated accumulated map).
* :class:`PixelAR`: the single-scale baseline, the quantised pixels in raster order, ``block_size``
  of them a group (1: classic next-pixel prediction, 64 evaluations for 8x8; 16: two rows a step,
  the same 4 evaluations as NFIG's 4 stages). Its input at a position is the token one group
  earlier (for ``block_size`` 1, the usual shift by one).

Where this adapts the paper (the official code was not released: its repository,
Noname0308-git/nfig, holds the abstract and one figure; the method text is followed):

* No VQ-VAE. The paper's frequency-guided residual quantizer (FR-VAE) quantizes features; here the
  tokens are the pixels' grey levels (``levels`` of them, uniform in [0, 1]), so the 8x8 digits need
  no tokenizer training and both models see exactly the same final image tokens.
* The frequency bands are the Haar multiresolution pyramid instead of an FFT low-pass: the map at
  scale ``s`` is the quantized block mean at ``s x s`` (the Haar approximation band, an ideal
  low-pass of the Haar basis), and stage ``k``'s tokens are the residual over the nearest-upsampled
  previous map (the Haar detail bands that scale adds), in ``2 levels - 1`` integer steps. Because
  every map lies on the same grey-level grid and nearest upsampling keeps the grid, the stages sum
  exactly to the quantized image (:func:`frequency_token_maps`), as the paper's residual stages sum
  to its feature map; an FFT band would not land on the grid.
* No KV cache: each evaluation reruns the whole (short, 85-token) sequence; the network-evaluation
  count is what the claim compares, not wall time.

Example:
    >>> model = NFIG(image_size=8, num_classes=10, levels=5, scales=(1, 2, 4, 8), d_model=16, n_layers=1, n_heads=2)
    >>> images = torch.rand(3, 1, 8, 8)
    >>> model.loss(images, torch.tensor([0, 1, 2])).shape
    torch.Size([3])
    >>> model.sample(torch.tensor([3, 7]), generator=torch.Generator().manual_seed(0)).shape
    torch.Size([2, 1, 8, 8])
    >>> model.network_evaluations, PixelAR(image_size=8, num_classes=10, block_size=16).network_evaluations
    (4, 4)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def quantize(images: Tensor, levels: int) -> Tensor:
    """Integer grey levels ``round(x (levels - 1))`` in ``[0, levels - 1]`` of images in [0, 1]."""
    return (images.float() * (levels - 1)).round().clamp(0, levels - 1).long()


def frequency_token_maps(images: Tensor, levels: int, scales: Sequence[int]) -> list[Tensor]:
    """NFIG's token maps of ``(N, 1, H, W)`` images: per scale ``s``, an ``(N, s, s)`` map of residual
    grey-level steps in ``[-(levels - 1), levels - 1]``.

    The map at scale ``s`` is ``Q(avgpool_s(x)) - up(Q(avgpool_{s'}(x)))`` with ``s'`` the previous
    scale (0 before the first), ``Q`` :func:`quantize` and ``up`` nearest upsampling. Summing the
    upsampled maps gives back ``Q(avgpool_s(x))`` at every scale, so the last map completes
    ``Q(x)`` exactly (:func:`accumulate`)."""
    maps, previous = [], None
    for s in scales:
        level = quantize(F.adaptive_avg_pool2d(images.float(), s), levels)[:, 0]
        base = torch.zeros_like(level) if previous is None else upsample(previous, s)
        maps.append(level - base)
        previous = level
    return maps


def upsample(grid: Tensor, size: int) -> Tensor:
    """Nearest upsampling of ``(N, s, s)`` integer maps to ``(N, size, size)`` (``size`` a multiple of ``s``)."""
    factor = size // grid.shape[-1]
    return grid.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1)


def accumulate(maps: Sequence[Tensor], levels: int) -> Tensor:
    """The ``(N, s, s)`` grey levels after the residual ``maps`` (smallest scale first), clamped to the
    grid (a sampled residual may step outside it)."""
    level = torch.zeros_like(maps[0])
    for residual in maps:
        level = (upsample(level, residual.shape[-1]) + residual).clamp(0, levels - 1)
    return level


class GroupedAR(nn.Module):
    """A transformer over a token sequence in groups, block-causal, one group per network evaluation.

    A subclass says what the tokens are: :meth:`tokens` (images to ``(N, T)`` token ids),
    :meth:`inputs` (``(N, T)`` values in [0, 1] at each position, from earlier groups only) and
    :meth:`images` (tokens back to images), with ``group_sizes`` and ``vocab_size``.

    Args:
        image_size: the images' height and width (square, one channel).
        num_classes: class-conditional with this many classes (0: unconditional).
        levels: grey levels of the tokens.
        d_model, n_layers, n_heads, dim_feedforward, dropout: the pre-norm ``nn.TransformerEncoder``'s.
    """

    def __init__(self, group_sizes: Sequence[int], vocab_size: int, image_size: int, num_classes: int, levels: int,
                 d_model: int, n_layers: int, n_heads: int, dim_feedforward: Optional[int], dropout: float) -> None:
        super().__init__()
        self.image_size, self.num_classes, self.levels = image_size, num_classes, levels
        self.group_sizes, self.vocab_size = tuple(group_sizes), vocab_size
        group = torch.repeat_interleave(torch.arange(len(group_sizes)), torch.tensor(group_sizes))
        self.register_buffer("group", group, persistent=False)
        # True where attention is blocked: keys of a later group
        self.register_buffer("blocked", group[None, :] > group[:, None], persistent=False)
        self.value = nn.Linear(1, d_model)
        self.position = nn.Parameter(torch.randn(len(group), d_model) * 0.02)
        self.condition = nn.Embedding(num_classes, d_model) if num_classes else None
        layer = nn.TransformerEncoderLayer(d_model, n_heads, dim_feedforward or 4 * d_model, dropout,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.transformer = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size)

    @property
    def network_evaluations(self) -> int:
        """Forward passes of one sampling run: one per group."""
        return len(self.group_sizes)

    def tokens(self, images: Tensor) -> Tensor:
        raise NotImplementedError

    def inputs(self, tokens: Tensor) -> Tensor:
        raise NotImplementedError

    def images(self, tokens: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, tokens: Tensor, labels: Optional[Tensor] = None) -> Tensor:
        """``(N, T, vocab_size)`` logits of every position's token, each from earlier groups' tokens."""
        h = self.value(self.inputs(tokens).unsqueeze(-1).to(self.position.dtype)) + self.position
        if self.condition is not None:
            h = h + self.condition(labels)[:, None]
        return self.head(self.norm(self.transformer(h, mask=self.blocked)))

    def loss(self, images: Tensor, labels: Optional[Tensor] = None) -> Tensor:
        """``(N,)`` mean cross-entropy (nats) per token of ``images``' tokens."""
        tokens = self.tokens(images)
        logits = self(tokens, labels)
        return F.cross_entropy(logits.float().transpose(1, 2), tokens, reduction="none").mean(1)

    @torch.no_grad()
    def sample(self, labels: Optional[Tensor] = None, num_samples: Optional[int] = None,
               generator: Optional[torch.Generator] = None, temperature: float = 1.0) -> Tensor:
        """``(N, 1, H, W)`` samples in [0, 1], group by group (one forward each), tokens drawn from the
        softmax at ``temperature``; ``labels`` the classes (``None``: ``num_samples`` unconditional)."""
        count = len(labels) if labels is not None else num_samples
        device = self.position.device
        tokens = torch.zeros(count, len(self.group), dtype=torch.long, device=device)
        for g in range(len(self.group_sizes)):
            where = self.group == g
            logits = self(tokens, labels)[:, where].float() / temperature
            drawn = torch.multinomial(logits.softmax(-1).flatten(0, 1), 1, generator=generator)
            tokens[:, where] = drawn.view(count, -1)
        return self.images(tokens)


class NFIG(GroupedAR):
    """Next-frequency generation: token maps from the lowest-frequency smallest scale to the full one.

    Token ``t`` at a stage is the residual step ``t - (levels - 1)`` (:func:`frequency_token_maps`);
    ``scales`` must increase, each divide the next and the last be ``image_size`` (the nearest
    upsampling of the Haar pyramid; module docstring).
    """

    def __init__(self, image_size: int = 8, num_classes: int = 10, levels: int = 5,
                 scales: Sequence[int] = (1, 2, 4, 8), d_model: int = 64, n_layers: int = 3, n_heads: int = 4,
                 dim_feedforward: Optional[int] = None, dropout: float = 0.0) -> None:
        scales = tuple(int(s) for s in scales)
        if scales[-1] != image_size or any(b % a or b <= a for a, b in zip(scales, scales[1:])):
            raise ValueError(f"NFIG: scales {scales} must increase, each dividing the next, up to the image size "
                             f"{image_size}. Fix: e.g. scales=(1, 2, 4, {image_size}).")
        super().__init__([s * s for s in scales], 2 * levels - 1, image_size, num_classes, levels, d_model, n_layers,
                         n_heads, dim_feedforward, dropout)
        self.scales = scales

    def _maps(self, tokens: Tensor) -> list[Tensor]:
        parts = tokens.split(self.group_sizes, dim=1)
        return [part.view(len(tokens), s, s) - (self.levels - 1) for part, s in zip(parts, self.scales)]

    def tokens(self, images: Tensor) -> Tensor:
        maps = frequency_token_maps(images, self.levels, self.scales)
        return torch.cat([m.flatten(1) for m in maps], dim=1) + (self.levels - 1)

    def inputs(self, tokens: Tensor) -> Tensor:
        maps, level = self._maps(tokens), torch.zeros_like(tokens[:, :1]).view(-1, 1, 1)
        values = [torch.zeros(len(tokens), self.group_sizes[0], device=tokens.device)]
        for residual, s in zip(maps[:-1], self.scales[1:]):
            level = (upsample(level, residual.shape[-1]) + residual).clamp(0, self.levels - 1)
            values.append(upsample(level, s).flatten(1).float() / (self.levels - 1))
        return torch.cat(values, dim=1)

    def images(self, tokens: Tensor) -> Tensor:
        return accumulate(self._maps(tokens), self.levels).unsqueeze(1).float() / (self.levels - 1)


class PixelAR(GroupedAR):
    """Single-scale autoregression: quantized pixels in raster order, ``block_size`` tokens a step.

    ``block_size`` must divide ``image_size ** 2``; 1 is next-pixel prediction.
    """

    def __init__(self, image_size: int = 8, num_classes: int = 10, levels: int = 5, block_size: int = 1,
                 d_model: int = 64, n_layers: int = 3, n_heads: int = 4, dim_feedforward: Optional[int] = None,
                 dropout: float = 0.0) -> None:
        pixels = image_size * image_size
        if block_size < 1 or pixels % block_size:
            raise ValueError(f"PixelAR: block_size {block_size} does not divide the {pixels} pixels. Fix: use a "
                             f"divisor of {pixels} (1 for next-pixel prediction).")
        super().__init__([block_size] * (pixels // block_size), levels, image_size, num_classes, levels, d_model,
                         n_layers, n_heads, dim_feedforward, dropout)
        self.block_size = block_size

    def tokens(self, images: Tensor) -> Tensor:
        return quantize(images, self.levels).flatten(1)

    def inputs(self, tokens: Tensor) -> Tensor:
        # the token one group earlier: a group's positions see (by attention) exactly the earlier groups
        shifted = F.pad(tokens[:, : -self.block_size], (self.block_size, 0))
        return shifted.float() / (self.levels - 1)

    def images(self, tokens: Tensor) -> Tensor:
        return tokens.view(len(tokens), 1, self.image_size, self.image_size).float() / (self.levels - 1)
