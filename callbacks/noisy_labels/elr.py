"""ELR — Early-Learning Regularization (Liu et al., NeurIPS 2020, paper 10).

Networks trained on noisy labels first fit the clean majority ("early learning") and only later
memorize the wrong labels. ELR keeps, for every training sample i, a running average t_i of the
model's own (detached, clamped, renormalised) predictions and adds a term that keeps the
prediction p_i close to it, which stops the gradient of the wrong label from taking over:

    p_i   = clamp(softmax(z_i), 1e-4, 1 - 1e-4)
    t_i  <- beta * t_i + (1 - beta) * p_i.detach() / sum(p_i.detach())      (t initialised to 0)
    loss  = CE(z, y) + lambda * mean_i log(1 - <t_i, p_i>)

Defaults follow the official code (github.com/shengliu66/ELR, ``ELR/model/loss.py`` and its
CIFAR-10 config): beta = 0.7, lambda = 3 for symmetric noise on CIFAR-10. The paper's other
settings: asymmetric noise on CIFAR-10 beta = 0.9, lambda = 1; CIFAR-100 beta = 0.9, lambda = 7.
As in the official code the targets are updated *before* the regularizer of the same step is
computed, and with the rows of the current batch only.

Method card (what it does, when it helps, what it costs): ``elr.card.yaml`` beside this module.

Example:
    >>> from reglab.callbacks import ELR
    >>> elr = ELR(beta=0.7, lam=3.0)   # add to Trainer(callbacks=[elr]) with a RegularizedMixin module
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import Tensor

from reglab.mixins import StepOutput
from reglab.technique import PerSampleTable, Technique, training_set_shape

PROBABILITY_CLAMP = 1e-4


def clamped_probabilities(logits: Tensor) -> Tensor:
    """softmax(z) clamped to [1e-4, 1 - 1e-4] in fp32, as the official ELR code does."""
    return logits.float().softmax(-1).clamp(PROBABILITY_CLAMP, 1.0 - PROBABILITY_CLAMP)


def elr_target_update(targets: Tensor, probs: Tensor, beta: float) -> Tensor:
    """New targets ``beta * t + (1 - beta) * p / sum(p)`` (``probs`` are detached here)."""
    probs = probs.detach()
    return beta * targets + (1.0 - beta) * probs / probs.sum(-1, keepdim=True)


def elr_regularizer(probs: Tensor, targets: Tensor) -> Tensor:
    """``mean_i log(1 - <t_i, p_i>)``: gradient flows through ``probs`` only."""
    return torch.log(1.0 - (targets.detach() * probs).sum(-1)).mean()


class ELR(Technique):
    """Early-learning regularization as a loss term (see the module docstring for the formula).

    Args:
        beta: momentum of the per-sample target average.
        lam: weight of the regularizer (the paper's lambda).
        num_samples, num_classes: size of the target table; taken from the DataModule
            (``num_train_samples``, ``num_classes``) when not given.
    """

    name = "elr"

    needs = frozenset({"index"})
    stateful = True

    def __init__(
        self,
        beta: float = 0.7,
        lam: float = 3.0,
        num_samples: int | None = None,
        num_classes: int | None = None,
    ) -> None:
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"ELR: beta must be in [0, 1), got {beta}")
        if lam < 0:
            raise ValueError(f"ELR: lam must be >= 0, got {lam}")
        self.beta = beta
        self.lam = lam
        self.num_samples = num_samples
        self.num_classes = num_classes
        self.targets = PerSampleTable()

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit" and self.targets.table is None:
            self.targets.allocate(*training_set_shape(self, trainer, self.num_samples, self.num_classes))

    def loss_terms(self, out: StepOutput, module: L.LightningModule) -> dict[str, Tensor]:
        probs = clamped_probabilities(out.logits)
        updated = elr_target_update(self.targets.rows(out.index), probs, self.beta)
        self.targets.write(out.index, updated, module)
        return {"regularizer": self.lam * elr_regularizer(probs, updated)}

    def state_dict(self) -> dict[str, Any]:
        return {"targets": self.targets.state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("targets") is not None:
            self.targets.load(state_dict["targets"])
