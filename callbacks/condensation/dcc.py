"""DCC: dataset condensation with contrastive signals (Lee et al., ICML 2022; paper 42).

DC matches the gradients class by class, so the loss of one class never sees another class's
images: nothing in it separates the classes (the paper's "no contrastive signals"), and DC falls
behind random selection where much of each image is shared between classes. DCC matches the
gradient of the loss summed over all classes instead:

    ``D( sum_c grad L(S_c), sum_c grad L(T_c) )``

(the mean over classes here, which D, a cosine distance, does not tell apart), so the matched
gradient carries what distinguishes the classes. The paper's bi-level warm-up stabilises the
start: the first ``warmup_iterations`` iterations use DC's class-wise loss, then the contrastive one.

The official code (github, "Dataset Condensation with Contrastive Signals", a fork of
VICO-UoE/DatasetCondensation with a ``--contrast`` flag) is not in this workspace's index; the
loss and the warm-up follow the paper's method text, the loop and its other defaults DC's code
(:mod:`reglab.condensation.matching`). ``warmup_iterations`` defaults to a tenth of the
iterations (a choice made here; the paper's count is for 1000 iterations on CIFAR).

Example:
    >>> import torch
    >>> images, labels = torch.rand(40, 1, 8, 8), torch.arange(40) % 2
    >>> condensed = DCC(iterations=2, warmup_iterations=1).condense(images, labels, ipc=1, seed=0)
    >>> condensed.images.shape, condensed.method
    (torch.Size([2, 1, 8, 8]), 'dcc')
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from reglab.condensation.matching import GradientMatching, classwise_distance, gradients_per_class, layerwise_distance
from reglab.condensation.pipeline import CHANNELS, CondensationError


def mean_gradients(per_class_gradients: list[tuple[Tensor, ...]]) -> list[Tensor]:
    """The mean over classes of each parameter's gradient."""
    return [torch.stack(grads).mean(0) for grads in zip(*per_class_gradients)]


class DCC(GradientMatching):
    """Contrastive gradient matching; arguments as :class:`~reglab.condensation.matching.GradientMatching`,
    plus ``warmup_iterations`` (default: ``iterations // 10``) of class-wise DC matching first."""

    name = "dcc"

    def __init__(self, iterations: int = 200, warmup_iterations: int | None = None, lr_img: float = 0.001,
                 momentum_img: float = 0.5, lr_net: float = 0.01, batch_real: int = 256, init: str = "noise",
                 channels: Sequence[int] = CHANNELS) -> None:
        super().__init__(iterations, lr_img, momentum_img, lr_net, batch_real, init, channels)
        self.warmup_iterations = iterations // 10 if warmup_iterations is None else warmup_iterations
        if not 0 <= self.warmup_iterations <= iterations:
            raise CondensationError(f"DCC: warmup_iterations={warmup_iterations} outside 0..iterations={iterations}. "
                                    "Fix: use fewer warm-up iterations than iterations.")

    def matching_loss(self, net: nn.Module, params: list[Tensor], real: list[Tensor], synthetic: list[Tensor],
                      iteration: int) -> Tensor:
        syn, ref = gradients_per_class(net, params, real, synthetic)
        if iteration < self.warmup_iterations:
            return classwise_distance(syn, ref)
        return layerwise_distance(mean_gradients(syn), mean_gradients(ref))
