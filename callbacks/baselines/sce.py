"""Symmetric cross-entropy (Wang et al., ICCV 2019) — a robust task-loss baseline.

Cross-entropy H(t, p) alone over-fits noisy labels on easy classes and under-learns hard ones;
SCE adds the *reverse* cross-entropy H(p, t), which is robust to label noise, with the target's
log(0) replaced by a constant A:

    SCE(z, t) = alpha * H(t, p) + beta * H(p, t)
              = -alpha * sum_c t_c log p_c  -  beta * sum_c p_c log max(t_c, floor)

For a hard label y the reverse term is ``-log(floor) * (1 - p_y)`` (A = log(floor)). Soft targets
(after a target transform) enter both terms as they are.

Defaults follow the official code (github.com/YisenWang/symmetric_cross_entropy_for_noisy_labels,
``loss.py`` and the CIFAR-10 run of ``train_models.py``): alpha = 0.1, beta = 1.0 (its MNIST run:
alpha = 0.01; CIFAR-100: alpha = 6.0, beta = 0.1); predictions clipped to [1e-7, 1] inside the
log of the CE term, targets clipped to [1e-4, 1] in the reverse term. Paper and code disagree on
A: the paper sets A = -4, the code's clip gives A = log(1e-4) ≈ -9.21. We follow the code
(``target_floor=1e-4``); ``target_floor=exp(-4)`` gives the paper's A.

Method card (what it does, when it helps, what it costs): ``sce.card.yaml`` beside this module.

Example:
    >>> import torch
    >>> from reglab.callbacks import SCE
    >>> loss = symmetric_cross_entropy(torch.zeros(1, 2), torch.tensor([0]), 0.1, 1.0, 1e-4)
    >>> round(float(loss), 4)   # 0.1 * log 2 + 1.0 * 9.2103 * 0.5
    4.6745
"""

from __future__ import annotations

import lightning as L
from torch import Tensor

from reglab.mixins import StepOutput
from reglab.step import target_distribution
from reglab.technique import Technique

PREDICTION_FLOOR = 1e-7  # the official code's clip of p inside log p


def symmetric_cross_entropy(logits: Tensor, target: Tensor, alpha: float, beta: float, target_floor: float) -> Tensor:
    """Per-sample ``alpha * H(t, p) + beta * H(p, t)`` in fp32 (``t`` one-hot for class indices)."""
    probs = logits.float().softmax(-1)
    targets = target_distribution(target, logits.shape[-1])
    forward = -(targets * probs.clamp(PREDICTION_FLOOR, 1.0).log()).sum(-1)
    reverse = -(probs * targets.clamp(target_floor, 1.0).log()).sum(-1)
    return alpha * forward + beta * reverse


class SCE(Technique):
    """Train with the symmetric cross-entropy instead of cross-entropy.

    Args:
        alpha: weight of the cross-entropy term.
        beta: weight of the reverse cross-entropy term.
        target_floor: targets are clipped to ``[target_floor, 1]`` inside the reverse term's log,
            so ``A = log(target_floor)``: 1e-4 as the official code, ``exp(-4)`` as the paper.
    """

    name = "sce"

    def __init__(self, alpha: float = 0.1, beta: float = 1.0, target_floor: float = 1e-4) -> None:
        if alpha < 0 or beta < 0 or alpha + beta == 0:
            raise ValueError(f"SCE: alpha and beta must be >= 0 and not both 0, got alpha={alpha}, beta={beta}")
        if not 0.0 < target_floor < 1.0:
            raise ValueError(f"SCE: target_floor must be in (0, 1), got {target_floor}")
        self.alpha, self.beta, self.target_floor = alpha, beta, target_floor

    def task_loss(self, out: StepOutput, module: L.LightningModule) -> Tensor:
        return symmetric_cross_entropy(out.logits, out.target, self.alpha, self.beta, self.target_floor)
