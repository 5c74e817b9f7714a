"""DC: dataset condensation by class-wise gradient matching (Zhao, Mopuri and Bilen, ICLR 2021).

For each class c the synthetic images S_c are moved so that the network's gradient on them
matches its gradient on real images T_c of the same class:
``sum_c D(grad L(S_c), grad L(T_c))`` (:func:`~reglab.condensation.matching.layerwise_distance`),
over many freshly initialised networks, each trained a little on S along the way. The loop, its
defaults and the deviations for 8x8 digits: :mod:`reglab.condensation.matching` (official code:
github.com/VICO-UoE/DatasetCondensation).

Example:
    >>> import torch
    >>> images, labels = torch.rand(40, 1, 8, 8), torch.arange(40) % 2
    >>> condensed = DatasetCondensation(iterations=2).condense(images, labels, ipc=1, seed=0)
    >>> condensed.images.shape, condensed.method
    (torch.Size([2, 1, 8, 8]), 'dataset_condensation')
"""

from __future__ import annotations

from torch import Tensor, nn

from reglab.condensation.matching import GradientMatching, classwise_distance, gradients_per_class


class DatasetCondensation(GradientMatching):
    """Class-wise gradient matching (arguments: :class:`~reglab.condensation.matching.GradientMatching`)."""

    name = "dataset_condensation"

    def matching_loss(self, net: nn.Module, params: list[Tensor], real: list[Tensor], synthetic: list[Tensor],
                      iteration: int) -> Tensor:
        return classwise_distance(*gradients_per_class(net, params, real, synthetic))
