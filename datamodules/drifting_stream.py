"""An online stream of digits with gradual class drift and gradual domain drift (no task boundaries).

The training split is one pass in a drawn order (stream time ``τ = position / (S - 1)`` in [0, 1]):

* **class drift** — the classes are permuted with the seed and class ``c`` gets a centre time
  ``t_c = (rank_c + 0.5) / C``; each training sample of class ``c`` gets the time key
  ``t_c + class_spread · ε`` (ε ~ N(0, 1)) and the stream is the samples sorted by key. So a class
  rises, peaks and fades, overlapping its neighbours in the order; ``class_spread`` → 0 gives
  disjoint consecutive classes, large values a stationary mixture.
* **domain drift** — the sample at time τ is rotated by ``max_angle · τ`` degrees: the input
  distribution turns slowly over the whole stream, across class boundaries.

Validation and test are upright splits of the same images (stratified, seeded), each image
rotated by an angle spread evenly over ``[0, max_angle]`` (a seeded deal), so accuracy there
measures every domain the stream passes through, the early ones (forgetting) and the late ones
(adaptation) alike. ``reglab.continual.online.AnytimeAccuracy`` evaluates on the seen classes.

The training loader walks the stream in order (no shuffle) and is resumable mid-stream; ``index``
is the stream position. Batches also carry ``time`` (τ of the sample).

Example:
    >>> data = DriftingDigitsDataModule(batch_size=8, seed=0)
    >>> data.setup("fit")
    >>> times = data.train_dataset.extras["time"]
    >>> bool((times[1:] >= times[:-1]).all()), data.input_shape
    (True, (64,))
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import ClassificationDataModule, ResumableDataLoader, Split
from .digits import DigitsDataModule
from .splits import check_holdout_fractions


def rotate_each(images: Tensor, angles: Tensor) -> Tensor:
    """``(N, 1, H, W)`` images, image i rotated counter-clockwise by ``angles[i]`` degrees about its
    centre (bilinear; what comes from outside the image is 0, the digits' background)."""
    radians = angles.to(images.dtype) * math.pi / 180
    cos, sin = radians.cos(), radians.sin()
    # affine_grid maps output to input coordinates: the inverse rotation (y points down in images)
    theta = torch.stack([torch.stack([cos, -sin, torch.zeros_like(cos)], -1),
                         torch.stack([sin, cos, torch.zeros_like(cos)], -1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def drifting_order(targets: Tensor, num_classes: int, class_spread: float, generator: torch.Generator) -> Tensor:
    """Positions of ``targets`` in stream order: sorted by ``t_c + class_spread · ε`` (module docstring).

    Example:
        >>> targets = torch.tensor([1, 0, 1, 0])
        >>> targets[drifting_order(targets, 2, 0.0, torch.Generator().manual_seed(0))].tolist()   # spread 0: one class, then the next
        [0, 0, 1, 1]
    """
    rank = torch.empty(num_classes)
    rank[torch.randperm(num_classes, generator=generator)] = torch.arange(num_classes, dtype=torch.float32)
    centres = (rank + 0.5) / num_classes
    keys = centres[targets] + class_spread * torch.randn(len(targets), generator=generator)
    return torch.sort(keys, stable=True).indices


class DriftingDigitsDataModule(ClassificationDataModule):
    """The digits as a drifting online stream (see the module docstring).

    Args:
        max_angle: rotation at the end of the stream, in degrees (0: class drift only).
        class_spread: standard deviation of a class's time around its centre, as a fraction of the
            stream (0: one class after another).
        flatten: ``(64,)`` inputs (for MLPs) instead of ``(1, 8, 8)``.
        val_fraction, test_fraction: share of each class held out (upright, then rotated as above).
        **kwargs: ``batch_size``, ``seed`` (of the splits, the class order and the stream) ...
    """

    num_classes = 10

    def __init__(self, max_angle: float = 45.0, class_spread: float = 0.08, flatten: bool = True,
                 val_fraction: float = 0.15, test_fraction: float = 0.25, **kwargs: Any) -> None:
        name = type(self).__name__
        if not 0.0 <= max_angle <= 360.0:
            raise ValueError(f"{name}: max_angle must lie in [0, 360] degrees, got {max_angle}.")
        if class_spread < 0:
            raise ValueError(f"{name}: class_spread must be >= 0 (a fraction of the stream), got {class_spread}.")
        check_holdout_fractions(name, val_fraction=val_fraction, test_fraction=test_fraction)
        self.max_angle, self.class_spread, self.flatten = max_angle, class_spread, flatten
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.input_shape = (64,) if flatten else (1, 8, 8)
        super().__init__(**kwargs)

    def _load_splits(self) -> dict[str, Split]:
        upright = DigitsDataModule(val_fraction=self.val_fraction, test_fraction=self.test_fraction, seed=self.seed)
        upright.setup()
        generator = torch.Generator().manual_seed(self.seed)
        train = upright.train_dataset
        order = drifting_order(train.targets, self.num_classes, self.class_spread, generator)
        time = torch.linspace(0.0, 1.0, len(order))
        splits: dict[str, Split] = {"train": (self._shaped(rotate_each(train.inputs[order], self.max_angle * time)),
                                              train.targets[order], {"time": time})}
        for name in ("val", "test"):
            pool = getattr(upright, f"{name}_dataset")
            spread = torch.linspace(0.0, self.max_angle, len(pool))[torch.randperm(len(pool), generator=generator)]
            splits[name] = (self._shaped(rotate_each(pool.inputs, spread)), pool.targets)
        return splits

    def _shaped(self, images: Tensor) -> Tensor:
        return images.reshape(-1, *self.input_shape)

    def train_dataloader(self) -> ResumableDataLoader:
        """The stream in order (no shuffle), sharded by rank, resumable mid-stream."""
        loader = super().train_dataloader()
        loader.sampler.shuffle = False  # the order is the drift
        return loader
