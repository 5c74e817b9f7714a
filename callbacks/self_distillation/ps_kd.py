"""PS-KD — progressive self-knowledge distillation (Kim et al., ICCV 2021, paper 65).

The model is its own teacher: the target of a sample mixes its label with the model's own
prediction for that sample from the previous epoch, more and more as training goes on:

    alpha_t  = alpha_T * (t + 1) / T           t = 0, ..., T - 1 the epoch, T the number of epochs
    target_i = (1 - alpha_t) * y_i + alpha_t * P[i]
    loss     = soft-target cross-entropy(z_i, target_i)        (the module's task loss)

The loss is the module's own task loss on soft targets, which runs through
:func:`reglab.kernels.soft_cross_entropy` (the fused Triton kernel on GPU).

``y_i`` is the incoming target as probabilities (the one-hot label, or soft targets of an
earlier technique) and ``P[i]`` the softmax prediction for sample ``i`` stored at its previous
visit. A sample that has no stored prediction yet -- every sample during epoch 0 -- is its own
teacher (``P[i] = y_i``), so epoch 0 trains on the plain targets.

Follows the official code (github.com/lgcnsai/PS-KD-Pytorch, ``main.py``):

* alpha_T = 0.8, T = the number of training epochs, and ``alpha_t = alpha_T * (epoch + 1) / T``
  with a 0-based epoch, so epoch 0 uses alpha_T / T and the last epoch alpha_T;
* P is one N x C table: a sample's row is read for its target, and overwritten once the
  training step is done with the softmax of the same forward pass (detached, train mode). A
  sampler that visits every sample once per epoch (reglab's does) therefore reads, in epoch t,
  the prediction made in epoch t - 1 -- the paper's P^{t-1} -- without a second table, and a
  checkpoint taken mid-epoch holds exactly the rows the rest of the epoch needs. Samplers that
  repeat a sample within an epoch would read that epoch's earlier prediction on the repeat, as
  the official code would;
* under DDP the rows of all ranks are gathered before writing, so every rank holds the same P.

T is the trainer's ``max_epochs`` unless ``total_epochs`` is given (needed when only
``max_steps`` bounds training: T must not change when a stopped run is resumed with other
limits, so it is never guessed from the step budget). With Mixup / CutMix, list PS-KD first so
that its per-sample targets are mixed with the inputs; P then holds predictions on mixed inputs.

Method card (what it does, when it helps, what it costs): ``ps_kd.card.yaml`` beside this module.

Example:
    >>> from reglab.callbacks import PSKD
    >>> PSKD(alpha_T=0.8).name
    'ps_kd'
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor

from reglab.mixins import StepOutput
from reglab.technique import PerSampleTable, Technique, schedule_epochs, training_set_shape


def pskd_alpha(epoch: int, total_epochs: int, alpha_T: float) -> float:
    """``alpha_T * (epoch + 1) / T`` for a 0-based ``epoch``, held at alpha_T past the last epoch."""
    return alpha_T * min(epoch + 1, total_epochs) / total_epochs


def pskd_targets(targets: Tensor, previous_predictions: Tensor, alpha: float) -> Tensor:
    """``(1 - alpha) * y + alpha * P``, where an all-zero row of ``P`` (no prediction stored
    yet) stands for ``y`` itself. ``targets`` are ``(N, C)`` probabilities."""
    stored = previous_predictions.sum(-1, keepdim=True) > 0
    teacher = torch.where(stored, previous_predictions, targets)
    return (1.0 - alpha) * targets + alpha * teacher


class PSKD(Technique):
    """Progressive self-knowledge distillation as a target transform (formula in the module
    docstring).

    Args:
        alpha_T: the weight of the model's own predictions in the last epoch.
        total_epochs: T of the schedule; the trainer's ``max_epochs`` when not given.
        num_samples, num_classes: size of the prediction table; taken from the DataModule
            (``num_train_samples``, ``num_classes``) when not given.
    """

    name = "ps_kd"

    needs = frozenset({"index"})
    stateful = True

    def __init__(
        self,
        alpha_T: float = 0.8,
        total_epochs: int | None = None,
        num_samples: int | None = None,
        num_classes: int | None = None,
    ) -> None:
        if not 0.0 <= alpha_T <= 1.0:
            raise ValueError(f"PSKD: alpha_T must be in [0, 1], got {alpha_T}")
        if total_epochs is not None and total_epochs < 1:
            raise ValueError(f"PSKD: total_epochs must be >= 1, got {total_epochs}")
        self.alpha_T = alpha_T
        self.total_epochs = total_epochs
        self.num_samples = num_samples
        self.num_classes = num_classes
        self.predictions = PerSampleTable()
        self._schedule_epochs: int | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit" and self.predictions.table is None:
            self.predictions.allocate(*training_set_shape(self, trainer, self.num_samples, self.num_classes))

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._schedule_epochs = schedule_epochs(self, trainer, self.total_epochs)

    def alpha(self, epoch: int) -> float:
        if self._schedule_epochs is None:
            raise RuntimeError("PSKD.alpha() is known once training has started")
        return pskd_alpha(epoch, self._schedule_epochs, self.alpha_T)

    def transform_targets(self, out: StepOutput, module: L.LightningModule) -> Tensor:
        alpha = self.alpha(module.current_epoch)
        targets = F.one_hot(out.target, out.logits.shape[-1]).float() if out.target.dim() == 1 else out.target.float()
        module.log(f"train/{self.name}/alpha", alpha, on_step=False, on_epoch=True, batch_size=len(targets))
        return pskd_targets(targets, self.predictions.rows(out.index), alpha)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = outputs["step_output"]
        self.predictions.write(step.index, step.logits.float().softmax(-1), pl_module)

    def state_dict(self) -> dict[str, Any]:
        return {"predictions": self.predictions.state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("predictions") is not None:
            self.predictions.load(state_dict["predictions"])
