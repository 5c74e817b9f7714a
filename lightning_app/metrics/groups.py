"""Accuracy per group of samples (a domain, an environment): :class:`GroupAccuracy`."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric


class GroupAccuracy(Metric):
    """Top-1 accuracy of each of ``num_groups`` groups; ``nan`` for a group no sample fell in
    (``(num_groups,)``, squeezed to a scalar for one group, as torchmetrics squeezes every result).

    The states are per-group sums (``correct``, ``total``), so under DDP ``compute()`` adds every
    rank's counts before dividing, and a group that only some ranks saw is still one number that
    all ranks agree on (torchmetrics' own classification metrics have no grouping).

    Example:
        >>> metric = GroupAccuracy(3)
        >>> metric.update(torch.tensor([0, 1, 1, 2]), torch.tensor([0, 1, 0, 2]), torch.tensor([0, 0, 0, 1]))
        >>> [round(v, 4) for v in metric.compute().tolist()]
        [0.6667, 1.0, nan]
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    correct: Tensor
    total: Tensor

    def __init__(self, num_groups: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.num_groups = num_groups
        self.add_state("correct", default=torch.zeros(num_groups, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.zeros(num_groups, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, predicted: Tensor, target: Tensor, group: Tensor) -> None:
        """``predicted`` and ``target`` class indices, ``group`` each sample's group, all ``(N,)``."""
        if not predicted.shape == target.shape == group.shape:
            raise ValueError(f"GroupAccuracy: predicted, target and group must be (N,) alike, got "
                             f"{tuple(predicted.shape)}, {tuple(target.shape)} and {tuple(group.shape)}.")
        group = group.long()
        self.correct += torch.bincount(group[predicted == target], minlength=self.num_groups)[: self.num_groups]
        self.total += torch.bincount(group, minlength=self.num_groups)[: self.num_groups]

    def compute(self) -> Tensor:
        return self.correct.double().div(self.total).float()
