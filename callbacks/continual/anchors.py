"""Shared core of the parameter regularizers of paper 40 (L2 to the previous task, EWC).

Both add ``lam * sum_i Omega_i (theta_i - theta*_i)^2`` where ``theta*`` are the parameters at the
end of the previous task and ``Omega`` their importance (1 for L2, the diagonal Fisher for EWC).
Before the first task ends there is no anchor and the term is 0, so in a plain single fit these
techniques change nothing. The functional core (the penalty, the trainable parameters by name, the
state flattening) is :mod:`reglab.anchors`, shared with L2-SP; the continual modules import it from here.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import lightning as L
import torch
from torch import Tensor

from reglab.anchors import flatten_state, quadratic_penalty, tensors_on, trainable_parameters, unflatten_state
from reglab.mixins import StepOutput
from reglab.technique import Technique


class AnchoredParameterPenalty(Technique):
    """Pulls the parameters towards their values at the end of the previous task.

    Subclasses say how important each parameter is (:meth:`updated_importance`). The anchor and
    importance are taken in :meth:`remember`, which the task runner calls at every task end; call
    it yourself to anchor to any model (e.g. a pretrained one).
    """

    stateful = True
    fsdp_unsupported = ("it compares every full parameter with its anchor, and FSDP may hold only this "
                        "rank's shard of a parameter when the loss is computed")

    def __init__(self, lam: float) -> None:
        if lam < 0:
            raise ValueError(f"{type(self).__name__}: lam must be >= 0, got {lam}")
        self.lam = lam
        self.anchor: dict[str, Tensor] = {}
        self.importance: dict[str, Tensor] | None = None

    def updated_importance(self, module: L.LightningModule, batches: Iterable[dict[str, Any]]) -> dict[str, Tensor] | None:
        """The importance after the task just finished (``None``: every parameter weighs 1)."""
        return None

    def remember(self, module: L.LightningModule, batches: Iterable[dict[str, Any]] = ()) -> AnchoredParameterPenalty:
        """Anchor to ``module``'s current parameters; ``batches`` are the finished task's data."""
        self.importance = self.updated_importance(module, batches)
        self.anchor = {name: p.detach().float().clone() for name, p in trainable_parameters(module).items()}
        return self

    def on_task_end(self, trainer: L.Trainer, pl_module: L.LightningModule, task: int) -> None:
        self.remember(pl_module, trainer.datamodule.train_dataloader())

    def loss_terms(self, out: StepOutput, module: L.LightningModule) -> dict[str, Tensor]:
        parameters = trainable_parameters(module)
        if not self.anchor:
            return {"penalty": torch.zeros((), device=out.logits.device)}
        device = next(iter(parameters.values())).device
        self.anchor = tensors_on(self.anchor, device)
        if self.importance is not None:
            self.importance = tensors_on(self.importance, device)
        return {"penalty": self.lam * quadratic_penalty(parameters, self.anchor, self.importance)}

    def state_dict(self) -> dict[str, Any]:
        state = flatten_state("anchor", self.anchor)
        if self.importance is not None:
            state.update(flatten_state("importance", self.importance))
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.anchor = unflatten_state("anchor", state_dict)
        self.importance = unflatten_state("importance", state_dict) or None

