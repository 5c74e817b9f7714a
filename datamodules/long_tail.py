"""Exponential class imbalance of the training split (the CIFAR-LT protocol).

Cao et al. (2019, LDAM-DRW, ``IMBALANCECIFAR10.get_img_num_per_cls``) keep, of class ``c`` out of
``C``, ``n_c = ⌊n_max · (1 / imbalance_ratio) ^ (c / (C − 1))⌋`` samples: class 0 is the head with
``n_max`` samples, class ``C − 1`` the tail with ``n_max / imbalance_ratio``. Here ``n_max`` is the
count of the most frequent class of the split being subsampled, and each class keeps
``min(n_c, its available count)`` — on a balanced split exactly the CIFAR-LT profile; on an uneven
one no class is asked for more samples than it has. Which samples of a class are kept is a seeded
random subset.

Example:
    >>> import torch
    >>> targets = torch.arange(3).repeat(100)          # 100 samples of each of 3 classes
    >>> kept = apply_long_tail(targets, 3, LongTail(imbalance_ratio=10.0))
    >>> torch.bincount(targets[kept]).tolist()
    [100, 31, 10]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class LongTail:
    """Exponential class imbalance to apply to the training split.

    Args:
        imbalance_ratio: ``n_max / n_min``, the head class count over the tail class count (≥ 1).
        seed: seed of which samples each class keeps.
    """

    imbalance_ratio: float = 100.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.imbalance_ratio < 1.0:
            raise ValueError(f"LongTail: imbalance_ratio is n_max / n_min and must be ≥ 1, got {self.imbalance_ratio}.")


def long_tail_class_counts(class_counts: Tensor, imbalance_ratio: float) -> Tensor:
    """How many samples each class keeps, given how many it has (``class_counts``, length C ≥ 2).

    Raises:
        ValueError: when the ratio is so large that some class would keep no sample at all.
    """
    num_classes = len(class_counts)
    if num_classes < 2:
        raise ValueError(f"LongTail: class imbalance needs at least 2 classes, got {num_classes}.")
    n_max = int(class_counts.max())
    # The exact float expression of LDAM-DRW's code, so that ⌊·⌋ rounds the same way.
    profile = torch.tensor(
        [int(n_max * (1.0 / imbalance_ratio) ** (c / (num_classes - 1.0))) for c in range(num_classes)]
    )
    if (profile == 0).any():
        raise ValueError(
            f"LongTail: imbalance_ratio={imbalance_ratio} leaves class {int((profile == 0).nonzero()[0])} without"
            f" training samples (the largest class has n_max={n_max}); use imbalance_ratio ≤ {n_max}."
        )
    return torch.minimum(profile, class_counts)


def apply_long_tail(targets: Tensor, num_classes: int, long_tail: LongTail) -> Tensor:
    """Positions (sorted, long) of the samples to keep so that class counts follow the CIFAR-LT profile."""
    keep_counts = long_tail_class_counts(torch.bincount(targets, minlength=num_classes), long_tail.imbalance_ratio)
    generator = torch.Generator().manual_seed(long_tail.seed)
    kept = []
    for cls in range(num_classes):
        members = (targets == cls).nonzero().flatten()
        kept.append(members[torch.randperm(len(members), generator=generator)[: keep_counts[cls]]])
    return torch.cat(kept).sort().values
