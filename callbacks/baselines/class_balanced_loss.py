"""Class-balanced loss (Cui et al., CVPR 2019) — a long-tail task-loss baseline.

Each class is weighted by the inverse of its *effective number of samples*
``E_n = (1 - beta^n) / (1 - beta)``, the expected volume that ``n`` samples cover when each new
sample overlaps the earlier ones with probability ``beta``; the weights are normalised to sum to
the number of classes C:

    w_c  = (1 - beta) / (1 - beta^{n_c}),      w <- C * w / sum(w)
    loss = - sum_c w_c t_c log softmax(z)_c    (t one-hot for class indices: w_y * CE(z, y))

beta = 0.9999 is the paper's choice for softmax CE on CIFAR-10-LT (its Table 2); beta -> 0 gives
plain CE, beta -> 1 inverse class frequency. Class counts ``n_c`` are those of the training split
as the DataModule gives it (after its long tail, noisy labels included), read at setup, or
``class_counts``. The official code (github.com/richardaecn/class-balanced-loss,
``cifar_main.py``) weights softmax, sigmoid and focal losses alike; this is its softmax variant,
averaged over the batch like its ``tf.losses.softmax_cross_entropy`` with per-sample weights.

Method card (what it does, when it helps, what it costs): ``class_balanced_loss.card.yaml`` beside this module.

Example:
    >>> import torch
    >>> class_balanced_weights(torch.tensor([100, 10]), beta=0.9999).round(decimals=3).tolist()
    [0.183, 1.817]
"""

from __future__ import annotations

import lightning as L
import torch
from torch import Tensor

from reglab.mixins import StepOutput
from reglab.step import target_distribution
from reglab.technique import Technique, training_class_counts


def class_balanced_weights(class_counts: Tensor, beta: float) -> Tensor:
    """``(C,)`` fp32 weights ``(1 - beta) / (1 - beta^n_c)`` normalised to sum to C (a class
    without samples gets the weight of a class with one)."""
    counts = class_counts.double().clamp_min(1.0)
    weights = (1.0 - beta) / (1.0 - torch.pow(torch.tensor(beta, dtype=torch.float64), counts))
    return (weights * len(weights) / weights.sum()).float()


def class_weighted_cross_entropy(logits: Tensor, target: Tensor, weights: Tensor) -> Tensor:
    """Per-sample ``- sum_c w_c t_c log softmax(z)_c`` in fp32, for class indices or soft targets."""
    log_probs = logits.float().log_softmax(-1)
    soft = target_distribution(target, logits.shape[-1])
    terms = soft * weights.to(logits.device) * log_probs
    # 0 * log p of a masked (-inf) class counts as 0, as in the default soft cross-entropy
    return -torch.where(soft > 0, terms, torch.zeros_like(terms)).sum(-1)


class ClassBalancedLoss(Technique):
    """Train with class-balanced (effective-number) weighted cross-entropy instead of cross-entropy.

    Args:
        beta: the effective-number hyperparameter in [0, 1).
        class_counts: training samples per class; counted from the DataModule's training split
            at setup when not given.
    """

    name = "class_balanced_loss"

    def __init__(self, beta: float = 0.9999, class_counts: list[int] | None = None) -> None:
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"ClassBalancedLoss: beta must be in [0, 1), got {beta}")
        self.beta = beta
        self.class_counts = class_counts
        self.weights: Tensor | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit":
            self.weights = class_balanced_weights(training_class_counts(self, trainer, self.class_counts), self.beta)

    def task_loss(self, out: StepOutput, module: L.LightningModule) -> Tensor:
        return class_weighted_cross_entropy(out.logits, out.target, self.weights)
