"""Contrastive building blocks shared by families: an augmented view of a batch of small images,
and the contrastive log-likelihoods over two views (SimCLR's NT-Xent, supervised contrast).

Views. The papers use the SimCLR/MoCo augmentations of 32x32 colour images (random resized
crop, flip, colour jitter); digits are 8x8 grey images, where a crop loses the digit and a flip
turns a 2 into an S. The view here is what stays a plausible digit: a random rotation of up to
``max_rotation`` degrees, a random translation of up to ``max_shift`` pixels (one bilinear
``grid_sample``, zeros outside) and Gaussian pixel noise of standard deviation ``noise``. Flat
inputs of a square size (the digits' 64) are treated as one-channel square images. The random
numbers come from a generator seeded with ``(seed, step)``, so a resumed run draws the same
views without any saved state, and the global RNG is left alone.

Contrastive terms. For ``2N`` L2-normalised features ``z`` (view 1 rows, then view 2 rows) and
masks of positives ``P`` and of the denominator ``D`` (neither holds the anchor itself):

    log p_ij  = z_i.z_j / tau_i - log sum_{k in D_i} exp(z_i.z_k / tau_i)
    term_i    = mean_{j in P_i} log p_ij

which is the supervised contrastive loss of Khosla et al. (2020) when ``P`` = same label and
``D`` = all others, and SimCLR's NT-Xent when ``P`` = the other view of the same sample.

They moved here from ``reglab.callbacks.noisy_labels._contrastive`` (RCAL, SBCL) when the PEFT
claims' contrastive pretraining (``pretrain_objective: simclr``) needed them too.

Example:
    >>> import torch
    >>> view = augmented_view(torch.rand(4, 64), step=0, seed=0)
    >>> view.shape
    torch.Size([4, 64])
    >>> float(nt_xent(torch.eye(2), torch.eye(2), temperature=1.0)) < float(nt_xent(torch.eye(2), torch.eye(2).flip(0), 1.0))
    True
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def augmented_view(
    inputs: Tensor, step: int, seed: int, max_rotation: float = 15.0, max_shift: float = 1.0, noise: float = 0.05
) -> Tensor:
    """A randomly rotated, shifted and noised copy of a batch of images ``(N, C, H, W)`` or of
    flat square images ``(N, H*W)``; the draw depends only on ``(seed, step)``."""
    flat = inputs.dim() == 2
    if flat:
        side = math.isqrt(inputs.shape[1])
        if side * side != inputs.shape[1]:
            raise ValueError(
                f"the contrastive view needs images: flat inputs of {inputs.shape[1]} features are not a square "
                "image. Fix: give (N, C, H, W) inputs or flat square ones (DigitsDataModule's 64)"
            )
        images = inputs.reshape(-1, 1, side, side)
    elif inputs.dim() == 4:
        images = inputs
    else:
        raise ValueError(
            f"the contrastive view needs images of shape (N, C, H, W) or flat square ones, got {tuple(inputs.shape)}. "
            "Fix: use an image DataModule"
        )
    n, _, height, width = images.shape
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    angle = (torch.rand(n, generator=generator) * 2 - 1) * math.radians(max_rotation)
    shift = (torch.rand(n, 2, generator=generator) * 2 - 1) * max_shift
    pixel_noise = torch.randn(images.shape, generator=generator) * noise
    cos, sin = angle.cos(), angle.sin()
    # affine_grid works in [-1, 1] coordinates: a shift of s pixels is 2 s / size
    theta = torch.stack(
        [torch.stack([cos, -sin, shift[:, 0] * 2 / width], 1), torch.stack([sin, cos, shift[:, 1] * 2 / height], 1)], 1
    )
    float_images = images.float()
    grid = F.affine_grid(theta.to(float_images.device), list(float_images.shape), align_corners=False)
    moved = F.grid_sample(float_images, grid, padding_mode="zeros", align_corners=False)
    view = (moved + pixel_noise.to(moved.device)).to(inputs.dtype)
    return view.reshape(inputs.shape) if flat else view


def two_view_masks(n: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """``(2N, 2N)`` bool masks: every pair but the anchor itself, and the anchor's other view."""
    eye = torch.eye(2 * n, dtype=torch.bool, device=device)
    return ~eye, eye.roll(n, dims=1)


def mean_positive_log_prob(
    features: Tensor, positives: Tensor, denominator: Tensor, temperature: float | Tensor
) -> Tensor:
    """``(2N,)`` mean over each anchor's positives of ``log p_ij`` (module docstring), in fp32.

    ``temperature`` is a number or a ``(2N, 1)`` column (one temperature per anchor)."""
    z = F.normalize(features.float(), dim=-1)
    logits = z @ z.T / temperature
    log_norm = torch.logsumexp(logits.masked_fill(~denominator, float("-inf")), dim=1, keepdim=True)
    log_prob = logits - log_norm
    return (log_prob * positives).sum(1) / positives.sum(1).clamp_min(1)


def nt_xent(view1: Tensor, view2: Tensor, temperature: float) -> Tensor:
    """SimCLR's NT-Xent: each sample's other view is its one positive among all ``2N - 1`` others."""
    not_self, other_view = two_view_masks(len(view1), view1.device)
    return -mean_positive_log_prob(torch.cat([view1, view2]), other_view, not_self, temperature).mean()
