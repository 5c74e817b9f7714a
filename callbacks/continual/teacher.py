"""Shared core of the distillation regularizers of paper 40 (prediction and feature distillation).

At every task end the model is copied and frozen as the teacher; while learning the next task
the student is kept close to the teacher's outputs on the *new* task's inputs (no old data is
stored). Before the first task ends there is no teacher and the term is 0.
"""

from __future__ import annotations

import copy
from typing import Any

import lightning as L
import torch
from torch import Tensor

from reglab.callbacks.continual.anchors import flatten_state, unflatten_state
from reglab.mixins import StepOutput
from reglab.technique import Technique


def frozen_copy(module: L.LightningModule) -> L.LightningModule:
    """An eval-mode copy of ``module`` without gradients (and without its trainer)."""
    trainer = module._trainer
    module._trainer = None  # the trainer must not be copied along
    try:
        teacher = copy.deepcopy(module)
    finally:
        module._trainer = trainer
    return teacher.eval().requires_grad_(False)


class PreviousModelDistillation(Technique):
    """Keeps a frozen copy of the model from the end of the previous task and the indices of the
    classes it knew (``old_classes``; all classes for a module without ``active_classes``).

    Subclasses compare the student's step output with the teacher's in :meth:`distillation`.
    The teacher is stored in checkpoints as its weights and rebuilt from the live module on load.
    """

    stateful = True
    fsdp_unsupported = "it deep-copies the module at a task's end, and under FSDP that copies this rank's shards"

    def __init__(self, lam: float) -> None:
        if lam < 0:
            raise ValueError(f"{type(self).__name__}: lam must be >= 0, got {lam}")
        self.lam = lam
        self.teacher: L.LightningModule | None = None
        self.old_classes: Tensor | None = None
        self._pending_weights: dict[str, Tensor] | None = None

    def distillation(self, out: StepOutput, teacher_out: StepOutput) -> Tensor:
        raise NotImplementedError

    def remember(self, module: L.LightningModule) -> PreviousModelDistillation:
        """Make ``module`` as it is now the teacher; its active classes become the old classes."""
        self.teacher, self._pending_weights = frozen_copy(module), None
        active = getattr(module, "active_classes", None)
        self.old_classes = None if active is None else active.detach().cpu().nonzero().flatten()
        return self

    def on_task_end(self, trainer: L.Trainer, pl_module: L.LightningModule, task: int) -> None:
        self.remember(pl_module)

    def loss_terms(self, out: StepOutput, module: L.LightningModule) -> dict[str, Tensor]:
        teacher = self._teacher_for(module)
        if teacher is None:
            return {"distillation": torch.zeros((), device=out.logits.device)}
        with torch.no_grad():
            teacher_out = teacher.forward_step(out.batch)
        return {"distillation": self.lam * self.distillation(out, teacher_out)}

    def _teacher_for(self, module: L.LightningModule) -> L.LightningModule | None:
        if self._pending_weights is not None:
            self.teacher = frozen_copy(module)
            self.teacher.load_state_dict(self._pending_weights)
            self._pending_weights = None
        if self.teacher is not None and self.teacher.device != module.device:
            self.teacher.to(module.device)
        return self.teacher

    def state_dict(self) -> dict[str, Any]:
        if self.teacher is None and self._pending_weights is None:
            return {}
        weights = self._pending_weights if self.teacher is None else self.teacher.state_dict()
        state = flatten_state("teacher", weights)
        if self.old_classes is not None:
            state["old_classes"] = self.old_classes.clone()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        weights = unflatten_state("teacher", state_dict)
        self.teacher, self._pending_weights = None, weights or None
        self.old_classes = state_dict.get("old_classes")
