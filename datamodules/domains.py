"""Domain shift on the embedded digits: DomainBed's RotatedMNIST protocol, in miniature.

Every domain is one rotation angle. As in DomainBed, each image belongs to exactly one domain
of its split: the images of a split are dealt round-robin, class by class, to the split's
angles, so every domain gets about the same number of images of every class. The upright
images are split into train / val / test pools first (stratified, seeded by ``split_seed``),
so an unseen test domain never shows an image the model was trained on, at any angle.

Batches carry ``domain``: the position of the sample's angle in :attr:`RotatedDigitsDataModule.domain_angles`
(the training angles first, so training domains are ``0 .. len(train_angles) - 1``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import torch
from torch import Tensor
from torchvision.transforms.functional import InterpolationMode, rotate

from .base import ClassificationDataModule, Split
from .digits import DigitsDataModule
from .label_noise import MNIST_ASYMMETRIC_MAP
from .splits import check_holdout_fractions

UPRIGHT_SHAPE = (1, 8, 8)


def rotate_images(images: Tensor, angle: float) -> Tensor:
    """``(N, 1, H, W)`` images rotated counter-clockwise by ``angle`` degrees about their centre.

    Bilinear interpolation; corners that come from outside the image are black (0), the digits'
    background.
    """
    if angle == 0:
        return images.clone()
    return rotate(images, float(angle), interpolation=InterpolationMode.BILINEAR, fill=0.0)


def deal_to_domains(targets: Tensor, num_domains: int, generator: torch.Generator) -> Tensor:
    """A domain index in ``[0, num_domains)`` per sample: shuffled, then dealt round-robin within
    each class, so every domain gets ``n_c / num_domains`` (±1) samples of class ``c``."""
    shuffled = torch.randperm(len(targets), generator=generator)
    by_class = shuffled[torch.sort(targets[shuffled], stable=True).indices]
    domains = torch.empty(len(targets), dtype=torch.long)
    domains[by_class] = torch.arange(len(targets)) % num_domains
    return domains


class RotatedDigitsDataModule(ClassificationDataModule):
    """Digits rotated by a few angles, one domain per angle; train on some, test on unseen ones.

    Args:
        train_angles: angles (degrees, counter-clockwise) of the training domains.
        val_angles: angles of the validation split's domains; default ``train_angles`` (held-out
            images of the training domains: DomainBed's training-domain validation).
        test_angles: angles of the test split's domains, typically unseen in training.
        split_seed: seed of the train/val/test split of the upright images (default ``seed``).
            Fix it to keep the image pools while ``seed`` varies the shuffle and the dealing, e.g.
            so that a model pretrained on the upright training pool never saw a test image.
        flatten: inputs of shape ``(64,)`` instead of ``(1, 8, 8)``.
        val_fraction, test_fraction: share of each class in the validation / test pool.
        **kwargs: :class:`~reglab.datamodules.base.ClassificationDataModule` arguments
            (``batch_size``, ``num_workers``, ``seed``, ``label_noise``, ``long_tail``, ``eval_batch_size``).

    Example:
        >>> data = RotatedDigitsDataModule(train_angles=[0, 15, 30], test_angles=[60], batch_size=16)
        >>> data.domain_angles, data.num_domains
        ((0.0, 15.0, 30.0, 60.0), 4)
        >>> data.setup("fit")
        >>> batch = next(iter(data.train_dataloader()))
        >>> batch["input"].shape, sorted(batch["domain"].unique().tolist())
        (torch.Size([16, 1, 8, 8]), [0, 1, 2])
        >>> data.test_dataset.extras["domain"].unique().tolist()
        [3]
    """

    num_classes = 10
    default_asymmetric_map = MNIST_ASYMMETRIC_MAP

    def __init__(
        self,
        train_angles: Sequence[float] = (0.0, 15.0, 30.0),
        val_angles: Optional[Sequence[float]] = None,
        test_angles: Sequence[float] = (60.0,),
        split_seed: Optional[int] = None,
        flatten: bool = False,
        val_fraction: float = 0.15,
        test_fraction: float = 0.25,
        **kwargs: Any,
    ) -> None:
        name = type(self).__name__
        val_angles = train_angles if val_angles is None else val_angles
        for arg, angles in (("train_angles", train_angles), ("val_angles", val_angles), ("test_angles", test_angles)):
            if len(angles) == 0:
                raise ValueError(f"{name}: {arg} is empty; give at least one angle per split.")
            if len(set(angles)) != len(angles):
                raise ValueError(f"{name}: {arg} repeats an angle ({list(angles)}); list each domain once.")
        self.train_angles = tuple(float(a) for a in train_angles)
        self.val_angles = tuple(float(a) for a in val_angles)
        self.test_angles = tuple(float(a) for a in test_angles)
        self.domain_angles = tuple(dict.fromkeys(self.train_angles + self.val_angles + self.test_angles))
        check_holdout_fractions(name, val_fraction=val_fraction, test_fraction=test_fraction)
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.flatten = flatten
        self.input_shape = (64,) if flatten else UPRIGHT_SHAPE
        super().__init__(**kwargs)
        self.split_seed = self.seed if split_seed is None else split_seed

    @property
    def num_domains(self) -> int:
        return len(self.domain_angles)

    def _load_splits(self) -> dict[str, Split]:
        upright = DigitsDataModule(val_fraction=self.val_fraction, test_fraction=self.test_fraction, seed=self.split_seed)
        upright.setup()
        pools = {
            "train": (upright.train_dataset, self.train_angles),
            "val": (upright.val_dataset, self.val_angles),
            "test": (upright.test_dataset, self.test_angles),
        }
        # One generator per split, so that changing one split's angles leaves the others' dealing alone.
        return {
            name: self._rotated(pool.inputs, pool.targets, angles, torch.Generator().manual_seed(self.seed + offset))
            for offset, (name, (pool, angles)) in enumerate(pools.items())
        }

    def _rotated(self, images: Tensor, targets: Tensor, angles: tuple[float, ...], generator: torch.Generator) -> Split:
        dealt = deal_to_domains(targets, len(angles), generator)
        rotated = torch.empty_like(images)
        domain = torch.empty(len(targets), dtype=torch.long)
        for local, angle in enumerate(angles):
            members = (dealt == local).nonzero().flatten()
            rotated[members] = rotate_images(images[members], angle)
            domain[members] = self.domain_angles.index(angle)
        return rotated.reshape(-1, *self.input_shape), targets, {"domain": domain}
