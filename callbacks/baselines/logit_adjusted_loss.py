"""Logit-adjusted loss (Menon et al., ICLR 2021) — a long-tail task-loss baseline.

Cross-entropy on logits shifted by the log class prior, so that minimising it approximates the
balanced error (the classifier learns ``p(x|y)`` up to a constant instead of ``p(y|x)``):

    loss = CE(z + tau * log(pi), t),      pi_c = n_c / sum(n)

Only the training loss is adjusted; predictions use the plain logits. tau = 1 is the paper's
default (and its official code's, github.com/google-research/google-research ``logit_adjustment``,
which adds ``tau * log(base_probs)`` to the logits in the loss). Targets may be class indices or
soft (the same soft cross-entropy as the default task loss). Class counts ``n_c`` are those of the
training split as the DataModule gives it, read at setup, or ``class_counts``; a class without
samples gets a prior of one sample rather than log 0.

Method card (what it does, when it helps, what it costs): ``logit_adjusted_loss.card.yaml`` beside this module.

Example:
    >>> import torch
    >>> log_prior(torch.tensor([3, 1])).exp().tolist()
    [0.75, 0.25]
"""

from __future__ import annotations

import lightning as L
from torch import Tensor

from reglab.mixins import StepOutput
from reglab.step import cross_entropy_per_sample
from reglab.technique import Technique, training_class_counts


def log_prior(class_counts: Tensor) -> Tensor:
    """``(C,)`` fp32 ``log(n_c / sum(n))`` (a class without samples counts as one sample)."""
    counts = class_counts.double().clamp_min(1.0)
    return (counts / counts.sum()).log().float()


def logit_adjusted_cross_entropy(logits: Tensor, target: Tensor, log_prior: Tensor, tau: float) -> Tensor:
    """Per-sample cross-entropy of ``z + tau * log(pi)`` (class indices or soft targets), in fp32."""
    return cross_entropy_per_sample(logits.float() + tau * log_prior.to(logits.device), target)


class LogitAdjustedLoss(Technique):
    """Train with the logit-adjusted cross-entropy instead of cross-entropy.

    Args:
        tau: scale of the log-prior offset (0 gives plain cross-entropy).
        class_counts: training samples per class; counted from the DataModule's training split
            at setup when not given.
    """

    name = "logit_adjusted_loss"

    def __init__(self, tau: float = 1.0, class_counts: list[int] | None = None) -> None:
        if tau < 0:
            raise ValueError(f"LogitAdjustedLoss: tau must be >= 0, got {tau}")
        self.tau = tau
        self.class_counts = class_counts
        self.log_prior: Tensor | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit":
            self.log_prior = log_prior(training_class_counts(self, trainer, self.class_counts))

    def task_loss(self, out: StepOutput, module: L.LightningModule) -> Tensor:
        return logit_adjusted_cross_entropy(out.logits, out.target, self.log_prior, self.tau)
