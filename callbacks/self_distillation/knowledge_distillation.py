"""Knowledge distillation from a fixed teacher (Hinton et al., 2015) — the plain KD baseline.

A trained teacher's temperature-softened predictions are a second target for the student:

    q_T  = softmax(teacher(x) / T),   p_T = softmax(student(x) / T)
    loss = CE(student(x), y) + weight * T^2 * KL(q_T || p_T)        (KL averaged over the batch)

The T^2 factor keeps the term's gradient magnitude independent of T (the soft gradients scale
as 1 / T^2). Defaults follow the standard KD baseline of the distillation literature
(github.com/HobbitLong/RepDistiller, ``DistillKL`` and its KD command): T = 4 and weight 0.9.
RepDistiller also scales cross-entropy by 0.1; reglab keeps the task loss at weight 1, so the
same weight makes the KL term 10x lighter relative to CE than there (weight 9 restores their
ratio, at a 10x larger loss scale).

The teacher is loaded at setup from a checkpoint -- a file, or the product of a ``reglab fit``
config, fitted once and cached as pretrained backbones are (:func:`reglab.checkpoints.fitted_checkpoint`) --
frozen, kept in eval mode and moved to the student's device. It sees the same batch as the
student (after batch transforms such as Mixup). Its logits come from ``forward_step`` when it
uses the step contract (any reglab module), else from ``teacher(batch["input"])``. The KL goes
through :func:`reglab.kernels.soft_cross_entropy`, the fused Triton kernel on GPU.

Method card (what it does, when it helps, what it costs): ``knowledge_distillation.card.yaml`` beside this module.

Example:
    >>> from reglab.callbacks import KnowledgeDistillation
    >>> KnowledgeDistillation("teacher.ckpt", temperature=4.0).name
    'knowledge_distillation'
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor

from reglab.checkpoints import fitted_checkpoint
from reglab.paths import ConfigPath
from reglab.kernels import soft_cross_entropy
from reglab.mixins import RegularizedMixin, StepOutput
from reglab.technique import Technique


def distillation_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """``T^2 * KL(softmax(teacher / T) || softmax(student / T))``, averaged over the batch."""
    teacher_probs = (teacher_logits.detach().float() / temperature).softmax(-1)
    kl = soft_cross_entropy(student_logits, teacher_probs, temperature=temperature, subtract_target_entropy=True)
    return temperature**2 * kl


def load_teacher(checkpoint: str, class_path: str) -> L.LightningModule:
    """The LightningModule ``class_path`` restored from ``checkpoint`` on the CPU, frozen, in eval mode."""
    module_name, _, class_name = class_path.rpartition(".")
    teacher_class = getattr(importlib.import_module(module_name), class_name)
    teacher = teacher_class.load_from_checkpoint(checkpoint, map_location="cpu")
    return teacher.eval().requires_grad_(False)


class KnowledgeDistillation(Technique):
    """Distil a fixed teacher into the student (formula in the module docstring).

    Args:
        teacher_checkpoint: path of the teacher's Lightning checkpoint.
        teacher_config: instead of ``teacher_checkpoint``, a ``reglab fit`` config that trains the
            teacher (fitted once, then cached under ``cache_dir``).
        teacher_class: class path of the teacher's LightningModule.
        temperature: T, softening both distributions.
        weight: weight of the ``T^2 * KL`` term.
        cache_dir: where teachers fitted from ``teacher_config`` are cached.

    In a config file, the three paths are relative to that file (:data:`reglab.paths.ConfigPath`).
    """

    name = "knowledge_distillation"

    def __init__(
        self,
        teacher_checkpoint: ConfigPath | None = None,
        teacher_config: ConfigPath | None = None,
        teacher_class: str = "reglab.tasks.ClassificationModule",
        temperature: float = 4.0,
        weight: float = 0.9,
        cache_dir: ConfigPath = "runs/pretrained",
    ) -> None:
        if (teacher_checkpoint is None) == (teacher_config is None):
            raise ValueError("KnowledgeDistillation: give exactly one of teacher_checkpoint and teacher_config")
        if temperature <= 0:
            raise ValueError(f"KnowledgeDistillation: temperature must be > 0, got {temperature}")
        if weight < 0:
            raise ValueError(f"KnowledgeDistillation: weight must be >= 0, got {weight}")
        self.teacher_checkpoint = teacher_checkpoint
        self.teacher_config = teacher_config
        self.cache_dir = cache_dir
        self.teacher_class = teacher_class
        self.temperature = temperature
        self.weight = weight
        self.teacher: L.LightningModule | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit" or self.teacher is not None:
            return
        if self.teacher_config is not None:
            checkpoint = fitted_checkpoint(trainer, self.teacher_config, self.cache_dir)
        else:
            checkpoint = Path(self.teacher_checkpoint)
        if not checkpoint.is_file():
            raise self.fail(
                f"the teacher checkpoint {str(checkpoint)!r} does not exist",
                "train the teacher first (`reglab fit` writes <run>/checkpoints/last.ckpt) and pass that "
                "file as teacher_checkpoint, or pass the teacher's config as teacher_config",
            )
        self.teacher = load_teacher(str(checkpoint), self.teacher_class)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # The student reaches its device after setup; the teacher follows it here.
        self.teacher.to(pl_module.device)

    def loss_terms(self, out: StepOutput, module: L.LightningModule) -> dict[str, Tensor]:
        with torch.no_grad():
            teacher_logits = self._teacher_logits(out.batch)
        return {"kl": self.weight * distillation_loss(out.logits, teacher_logits, self.temperature)}

    def _teacher_logits(self, batch: dict[str, Any]) -> Tensor:
        if isinstance(self.teacher, RegularizedMixin):
            return self.teacher.forward_step(batch).logits
        return self.teacher(batch["input"])
