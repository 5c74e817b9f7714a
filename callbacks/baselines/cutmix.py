"""CutMix (Yun et al., ICCV 2019) — a batch-mixing baseline.

A box cut from a random partner's image is pasted into every training image; the targets are
mixed in proportion to the pixels each image keeps:

    lam ~ Beta(alpha, alpha),  perm = a random permutation of the batch
    box: side ratio sqrt(1 - lam) of each image side, centre uniform over the image, clipped
        at the borders
    x'  = x with x[perm] inside the box
    lam' = 1 - box area / image area             (the box may be clipped, so lam' >= lam)
    t'  = lam' * t + (1 - lam') * t[perm]

Defaults follow the official code and its CIFAR / ImageNet commands
(github.com/clovaai/CutMix-PyTorch, ``train.py``, README): alpha (their ``beta``) = 1.0, and a
batch is cut-mixed with probability 0.5 (``cutmix_prob``). As there, the half-sides are
``floor(side * sqrt(1 - lam)) // 2`` on each side of the centre.

The box spans the last two dimensions of the input. Flat inputs (an MLP's ``(N, 64)`` digits)
name the image they flatten with ``image_shape`` (e.g. ``(1, 8, 8)``); they are cut as images
and flattened back.

Method card (what it does, when it helps, what it costs): ``cutmix.card.yaml`` beside this module.

Example:
    >>> from reglab.callbacks import CutMix
    >>> CutMix(alpha=1.0, probability=0.5).name
    'cutmix'
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from reglab.callbacks.baselines.mixing import BatchMixing


class Box(NamedTuple):
    """Rows ``top:bottom`` and columns ``left:right`` of an image."""

    top: int
    bottom: int
    left: int
    right: int

    def area(self) -> int:
        return (self.bottom - self.top) * (self.right - self.left)


def cut_box(height: int, width: int, lam: float, centre: tuple[int, int]) -> Box:
    """The box around ``centre`` whose sides are ``sqrt(1 - lam)`` of the image's, clipped."""
    side_ratio = math.sqrt(1.0 - lam)
    half_height, half_width = int(height * side_ratio) // 2, int(width * side_ratio) // 2
    row, column = centre
    return Box(
        top=min(max(row - half_height, 0), height),
        bottom=min(max(row + half_height, 0), height),
        left=min(max(column - half_width, 0), width),
        right=min(max(column + half_width, 0), width),
    )


def random_box(height: int, width: int, lam: float) -> Box:
    """:func:`cut_box` around a centre drawn uniformly from the pixels (global torch RNG)."""
    centre = (int(torch.randint(height, ())), int(torch.randint(width, ())))
    return cut_box(height, width, lam, centre)


def kept_share(box: Box, height: int, width: int) -> float:
    """``1 - box area / image area``: the share of its own pixels an image keeps."""
    return 1.0 - box.area() / (height * width)


def paste_box(images: Tensor, permutation: Tensor, box: Box) -> Tensor:
    """A copy of ``images`` with ``images[permutation]`` inside ``box`` (last two dimensions)."""
    mixed = images.clone()
    region = (..., slice(box.top, box.bottom), slice(box.left, box.right))
    mixed[region] = images[permutation][region]
    return mixed


class CutMix(BatchMixing):
    """Paste a box from a partner image and mix targets by area (formula in the module docstring).

    Args:
        alpha: concentration of Beta(alpha, alpha) for the box's share before clipping.
        probability: chance that a batch is cut-mixed (the official commands use 0.5).
        image_shape: the image shape of flat inputs, e.g. ``(1, 8, 8)``; ``None`` when inputs are
            already images (at least ``(N, H, W)``).
    """

    name = "cutmix"

    def __init__(self, alpha: float = 1.0, probability: float = 0.5, image_shape: Sequence[int] | None = None) -> None:
        super().__init__(alpha=alpha, probability=probability)
        self.image_shape = tuple(image_shape) if image_shape is not None else None

    def blend_inputs(self, inputs: Tensor, permutation: Tensor, lam: float) -> tuple[Tensor, float]:
        images = inputs if self.image_shape is None else inputs.reshape(len(inputs), *self.image_shape)
        if images.dim() < 3:
            raise self.fail(
                f"it cuts boxes from images, but the inputs have shape {tuple(inputs.shape)}",
                "pass image_shape (e.g. image_shape: [1, 8, 8] for flattened digits) or use image inputs",
            )
        height, width = images.shape[-2:]
        box = random_box(height, width, lam)
        return paste_box(images, permutation, box).reshape(inputs.shape), kept_share(box, height, width)
