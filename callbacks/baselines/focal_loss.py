"""Focal loss (Lin et al., ICCV 2017) — a task-loss baseline for class imbalance.

Cross-entropy scaled by ``(1 - p_t)^gamma``, which shrinks the loss of well-classified samples so
that training concentrates on the hard ones; an optional class weight ``alpha_t`` balances classes:

    FL(z, y) = -alpha_y * (1 - p_y)^gamma * log p_y,          gamma = 2 (the paper's choice)

With soft targets t (after a target transform): ``-sum_c t_c alpha_c (1 - p_c)^gamma log p_c``.

The paper's detector uses the sigmoid (one-vs-all) form with a scalar alpha = 0.25 for the
foreground class; for a softmax classifier there is no foreground class, so ``alpha`` here is one
weight per class (``None``: all 1), and the loss is the softmax form the paper's appendix notes
works as well. torchvision's ``sigmoid_focal_loss`` is the one-vs-all form, so it is not used.
The official code is Detectron's (Caffe2) detection loss; this follows the paper's formula.

Method card (what it does, when it helps, what it costs): ``focal_loss.card.yaml`` beside this module.

Example:
    >>> import torch
    >>> from reglab.callbacks import FocalLoss
    >>> loss = focal_loss(torch.zeros(1, 2), torch.tensor([0]), gamma=2.0)
    >>> round(float(loss), 4)   # (1 - 0.5)^2 * log 2
    0.1733
"""

from __future__ import annotations

from collections.abc import Sequence

import lightning as L
import torch
from torch import Tensor

from reglab.mixins import StepOutput
from reglab.step import target_distribution
from reglab.technique import Technique


def focal_loss(logits: Tensor, target: Tensor, gamma: float, alpha: Tensor | None = None) -> Tensor:
    """Per-sample ``-sum_c t_c alpha_c (1 - p_c)^gamma log p_c`` in fp32 (``t`` one-hot for indices)."""
    log_probs = logits.float().log_softmax(-1)
    targets = target_distribution(target, logits.shape[-1])
    weights = targets * (1.0 - log_probs.exp()).pow(gamma)
    if alpha is not None:
        weights = weights * alpha.to(weights.device)
    # 0 * log 0 is 0: a masked (-inf) logit of a class the target does not hold adds nothing (and
    # no NaN gradient); a NaN logit still gives a NaN loss, for the non-finite guard to report
    return -(weights * log_probs.masked_fill(targets == 0, 0.0)).sum(-1)


class FocalLoss(Technique):
    """Train with the focal loss instead of cross-entropy.

    Args:
        gamma: the focusing exponent (0 gives cross-entropy).
        alpha: one weight per class (e.g. inverse class frequencies), or ``None`` for none.
    """

    name = "focal_loss"

    def __init__(self, gamma: float = 2.0, alpha: Sequence[float] | None = None) -> None:
        if gamma < 0:
            raise ValueError(f"FocalLoss: gamma must be >= 0, got {gamma}")
        if alpha is not None and (len(alpha) == 0 or min(alpha) < 0):
            raise ValueError(f"FocalLoss: alpha must be one non-negative weight per class, got {alpha}")
        self.gamma = gamma
        self.alpha = None if alpha is None else torch.tensor([float(a) for a in alpha])

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        classes = getattr(trainer.datamodule, "num_classes", None) or getattr(pl_module, "num_classes", None)
        if stage == "fit" and self.alpha is not None and classes is not None and len(self.alpha) != classes:
            raise self.fail(
                f"alpha has {len(self.alpha)} weights but the data has {classes} classes",
                f"give one weight per class ({classes}), or leave alpha unset",
            )

    def task_loss(self, out: StepOutput, module: L.LightningModule) -> Tensor:
        return focal_loss(out.logits, out.target, self.gamma, self.alpha)
