"""Pixel masking — the masked image modeling baseline of MFM's comparison (MAE, He et al., CVPR
2022; SimMIM, Xie et al., CVPR 2022): remove random square patches of each training image, predict
the image from the features, mean squared error on the removed pixels.

* mask (:func:`patch_masks`): the image is cut into ``patch_size`` x ``patch_size`` patches and, per
  image, ``int(L * (1 - mask_ratio))`` of its ``L`` patches are kept, chosen uniformly (MAE's
  ``random_masking``: the lowest of ``L`` uniform draws); MAE's ratio 0.75;
* corruption: the removed pixels are set to 0 (a CNN sees the whole grid; MAE drops the tokens and
  SimMIM puts a learned mask token in their place, neither of which a convolutional or flat input
  has);
* loss: ``(pred - x)²`` on the removed pixels, their mean (MAE's loss on the masked patches with
  ``norm_pix_loss = False``, its code's default), per sample as in :mod:`~reglab.callbacks.self_supervised.mfm`.

Written from MAE's method and code (github.com/facebookresearch/mae, ``models_mae.py``); the patch
size is in pixels (default 2: MAE's 16 px at 224 px would be under a pixel of an 8 px digit). It
shares MFM's machinery (decoder from the pooled features, per-sample task loss, restore hook):
:class:`~reglab.callbacks.self_supervised.mfm.MaskedImageModeling`.

Method card: ``pixel_mask.card.yaml`` beside this module.

Example:
    >>> from reglab.callbacks import PixelMask
    >>> pixel_mask = PixelMask(image_shape=(1, 8, 8), mask_ratio=0.75, patch_size=2)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from reglab.callbacks.self_supervised.mfm import MaskedImageModeling, removed_mean


def patch_masks(noise: Tensor, keep: int, patch_size: int) -> Tensor:
    """``(N, 1, H, W)`` masks of kept pixels from ``noise`` (N, H/p, W/p): in each image the ``keep``
    patches of lowest noise are kept (1), the others removed (0)."""
    flat = noise.flatten(1)
    kept = torch.zeros_like(flat).scatter_(1, flat.argsort(1)[:, :keep], 1.0)
    return kept.view_as(noise).repeat_interleave(patch_size, 1).repeat_interleave(patch_size, 2)[:, None]


class PixelMask(MaskedImageModeling):
    """Masked pixel modeling on random patches (module docstring).

    Args:
        image_shape: see :class:`~reglab.callbacks.self_supervised.mfm.MaskedImageModeling`.
        mask_ratio: share of the patches removed (MAE: 0.75).
        patch_size: side of a patch in pixels; it divides the image's height and width.
        export_path: see :class:`~reglab.callbacks.self_supervised.mfm.MaskedImageModeling`.
    """

    name = "pixel_mask"

    def __init__(self, image_shape: tuple[int, int, int] | None = None, mask_ratio: float = 0.75,
                 patch_size: int = 2, export_path: str | None = None) -> None:
        super().__init__(image_shape, export_path)
        if not 0 < mask_ratio < 1:
            raise ValueError(f"PixelMask: mask_ratio (the share of patches removed) is in (0, 1), got {mask_ratio}")
        if patch_size < 1:
            raise ValueError(f"PixelMask: patch_size must be >= 1 pixel, got {patch_size}")
        self.mask_ratio, self.patch_size = mask_ratio, patch_size

    def corrupt(self, images: Tensor) -> tuple[Tensor, Tensor]:
        height, width = images.shape[-2:]
        if height % self.patch_size or width % self.patch_size:
            raise self.fail(f"patch_size {self.patch_size} does not divide the {height}x{width} images",
                            "choose a patch_size that divides the image's height and width")
        grid = (len(images), height // self.patch_size, width // self.patch_size)
        keep = int(grid[1] * grid[2] * (1 - self.mask_ratio))
        masks = patch_masks(torch.rand(grid, device=images.device), keep, self.patch_size)
        return images * masks, masks

    def reconstruction_loss(self, prediction: Tensor, images: Tensor, masks: Tensor) -> Tensor:
        return removed_mean(F.mse_loss(prediction, images, reduction="none"), masks)
