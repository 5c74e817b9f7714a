"""Random subset selection: ``ipc`` real training images per class drawn at random, the lower
baseline of every dataset condensation paper (the "Random" row of DC, DCC and NRR-DD's tables).

Example:
    >>> import torch
    >>> images, labels = torch.rand(20, 1, 8, 8), torch.arange(20) % 2
    >>> subset = RandomSubset().condense(images, labels, ipc=3, seed=0)
    >>> subset.labels.tolist()
    [0, 0, 0, 1, 1, 1]
    >>> all(any(torch.equal(x, y) for y in images) for x in subset.images)  # real images, untouched
    True
"""

from __future__ import annotations

import torch
from torch import Tensor

from reglab.condensation.pipeline import CondensationMethod, CondensedSet, class_labels, per_class, sample


class RandomSubset(CondensationMethod):
    """``ipc`` real images per class, drawn without replacement (seeded)."""

    name = "random_subset"

    def condense(self, images: Tensor, labels: Tensor, ipc: int, seed: int) -> CondensedSet:
        self.check_ipc(self.name, labels, ipc)
        generator = torch.Generator().manual_seed(seed)
        classes = per_class(images, labels)
        chosen = torch.cat([sample(c, ipc, generator) for c in classes])
        return CondensedSet(chosen, class_labels(len(classes), ipc), self.name, ipc)
