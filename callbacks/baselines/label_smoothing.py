"""Label smoothing (Szegedy et al., 2016) — a target-transform baseline.

The one-hot target is mixed with the uniform distribution over the C classes:

    y_smooth = (1 - epsilon) * onehot(y) + epsilon / C

If an earlier technique already produced soft targets, those are smoothed instead.

Method card (what it does, when it helps, what it costs): ``label_smoothing.card.yaml`` beside this module.

Example:
    >>> from reglab.callbacks import LabelSmoothing
    >>> LabelSmoothing(epsilon=0.1).name
    'label_smoothing'
"""

from __future__ import annotations

import lightning as L
import torch.nn.functional as F
from torch import Tensor

from reglab.mixins import StepOutput
from reglab.technique import Technique


def smooth_targets(target: Tensor, num_classes: int, epsilon: float) -> Tensor:
    """``(1 - epsilon) * t + epsilon / C`` with ``t`` one-hot for class indices."""
    probs = F.one_hot(target, num_classes).float() if target.dim() == 1 else target.float()
    return (1.0 - epsilon) * probs + epsilon / num_classes


class LabelSmoothing(Technique):
    """Replace the training target by its smoothed version (formula in the module docstring).

    Args:
        epsilon: the mass moved to the uniform distribution.
    """

    name = "label_smoothing"

    def __init__(self, epsilon: float = 0.1) -> None:
        if not 0.0 <= epsilon <= 1.0:
            raise ValueError(f"LabelSmoothing: epsilon must be in [0, 1], got {epsilon}")
        self.epsilon = epsilon

    def transform_targets(self, out: StepOutput, module: L.LightningModule) -> Tensor:
        return smooth_targets(out.target, out.logits.shape[-1], self.epsilon)
