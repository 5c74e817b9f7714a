"""scikit-learn's bundled handwritten digits: 1,797 8×8 images of 10 classes, no download."""

from __future__ import annotations

from typing import Any

import torch
from sklearn.datasets import load_digits
from torch import Tensor

from .base import ClassificationDataModule, Split
from .label_noise import MNIST_ASYMMETRIC_MAP
from .splits import check_holdout_fractions, stratified_split


def digit_images() -> tuple[Tensor, Tensor]:
    """All 1,797 images as an ``(N, 1, 8, 8)`` float tensor in [0, 1] and their ``(N,)`` labels."""
    digits = load_digits()
    # Pixel values are integers 0..16.
    images = torch.tensor(digits.images, dtype=torch.float32).div(16.0).unsqueeze(1)
    return images, torch.tensor(digits.target, dtype=torch.long)


class DigitsDataModule(ClassificationDataModule):
    """The embedded stand-in for MNIST: digits scaled to [0, 1], split seeded and stratified.

    ``LabelNoise(kind="asymmetric")`` without a ``class_map`` uses the MNIST protocol's
    :data:`~reglab.datamodules.label_noise.MNIST_ASYMMETRIC_MAP` (7→1, 2→7, 5↔6, 3→8).

    Args:
        flatten: give inputs of shape ``(64,)`` (for MLPs / linear models) instead of ``(1, 8, 8)``.
        val_fraction: fraction of each class held out for validation.
        test_fraction: fraction of each class held out for testing.
        **kwargs: :class:`~reglab.datamodules.base.ClassificationDataModule` arguments
            (``batch_size``, ``num_workers``, ``seed``, ``label_noise``, ``long_tail``, ``eval_batch_size``).

    Example:
        >>> data = DigitsDataModule(flatten=True, batch_size=16)
        >>> data.setup("fit")
        >>> batch = next(iter(data.train_dataloader()))
        >>> batch["input"].shape, data.num_classes, data.num_train_samples
        (torch.Size([16, 64]), 10, 1078)
    """

    num_classes = 10
    default_asymmetric_map = MNIST_ASYMMETRIC_MAP

    def __init__(
        self, flatten: bool = False, val_fraction: float = 0.15, test_fraction: float = 0.25, **kwargs: Any
    ) -> None:
        check_holdout_fractions(type(self).__name__, val_fraction=val_fraction, test_fraction=test_fraction)
        self.flatten = flatten
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.input_shape = (64,) if flatten else (1, 8, 8)
        super().__init__(**kwargs)

    def _load_splits(self) -> dict[str, Split]:
        images, targets = digit_images()
        inputs = images.reshape(-1, *self.input_shape)
        positions = stratified_split(targets, {"val": self.val_fraction, "test": self.test_fraction}, self.seed)
        return {name: (inputs[split], targets[split]) for name, split in positions.items()}
