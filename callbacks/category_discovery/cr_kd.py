"""Cr-KD (Gu et al., ICCV 2023): class-relation knowledge distillation from the known-class model to
the learning of the novel classes, with a learnable per-sample weight."""

from __future__ import annotations

import copy
from typing import Any, Optional

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reglab.step import StepOutput
from reglab.tasks import DiscoveryModule
from reglab.technique import Technique


def class_relation_kd(teacher_known: Tensor, student: Tensor, num_known_classes: int, temperature: float) -> Tensor:
    """Cr-KD's loss per unlabelled row (``KD`` of the official code's ``model/losses.py``).

    ``teacher_known``: the known-class model's logits over the known classes; ``student``: the model's
    logits over all classes (known first), both already divided by the classifier temperature. The
    class relation of a sample is the teacher's distribution over the known classes at the
    distillation ``temperature`` ``T``; the student's known-class part is pulled to it by a
    cross-entropy times ``T**2``, weighted by the mass the student puts on the known classes (over
    all classes, at ``T``) normalized by its batch mean: novel samples that look like known classes
    keep more of the relation. The weight is not detached (the code's "learnable" weight).

    Example:
        >>> teacher = torch.tensor([[0.0, 0.0]])
        >>> student = torch.tensor([[0.0, 0.0, 0.0]])  # weight 2/3 / mean 2/3 = 1
        >>> round(float(class_relation_kd(teacher, student, 2, temperature=1.0)), 4)  # log 2
        0.6931
    """
    relation = F.softmax(teacher_known.detach().float() / temperature, dim=-1)
    log_student_known = F.log_softmax(student[:, :num_known_classes].float() / temperature, dim=-1)
    weight = F.softmax(student.float() / temperature, dim=-1)[:, :num_known_classes].sum(-1)
    weight = weight / weight.mean()
    return -(relation * log_student_known).sum(-1) * temperature**2 * weight


class CrKD(Technique):
    """Cr-KD on :class:`~reglab.tasks.DiscoveryModule`: distils the class relations of a frozen
    known-class model into the discovery training (:func:`class_relation_kd` on the unlabelled
    samples of both views, weighted ``alpha``; logged as ``train/cr_kd/kd``).

    The known-class model is the module as it stands when the technique's first fit starts: train
    it on the known classes first (the official code loads its supervised pre-training checkpoint
    into both the model and the frozen teacher; here e.g. a first fit with ``sup_weight: 1.0``, the
    labelled terms only). Its backbone and classifier are copied then, frozen and kept in the
    technique's state (checkpoints hold it, so a resumed fit distils from the same model).

    Follows the official code (github.com/kleinzcy/Cr-KD-NCD, ``rKD.py``, ``model/losses.py``,
    ``scripts/discover_cifar.yaml``): ``alpha`` 0.1, distillation temperature 4 over logits already
    divided by the classifier temperature (the module's ``student_temperature``, 0.1 in both), on the
    two large crops. The code's model has a separate known-class head and novel-class heads (UNO's
    multi-head, Sinkhorn pseudo-labels); here the teacher's and the student's known classes are the
    first ``num_known_classes`` outputs of the one cosine classifier of the SimGCD-style module, and
    the clustering loss is the module's.

    Args:
        alpha: the weight of the distillation loss.
        temperature: the distillation temperature ``T``.

    Example:
        >>> from reglab.datamodules import DiscoveryDataModule
        >>> data = DiscoveryDataModule("blobs", known_classes=[0, 1, 2], mode="ncd", batch_size=64)
        >>> module = DiscoveryModule("mlp", input_shape=data.input_shape, num_classes=data.num_classes,
        ...                          num_known_classes=data.num_known_classes)
        >>> trainer = L.Trainer(max_steps=2, callbacks=[CrKD()], logger=False, enable_checkpointing=False,
        ...                     enable_progress_bar=False, enable_model_summary=False)
        >>> trainer.fit(module, datamodule=data)
        >>> "train/cr_kd/kd" in trainer.callback_metrics
        True
    """

    name = "cr_kd"
    stateful = True

    def __init__(self, alpha: float = 0.1, temperature: float = 4.0) -> None:
        if alpha < 0:
            raise self.fail(f"alpha {alpha} must not be negative", "use e.g. the code's 0.1")
        if temperature <= 0:
            raise self.fail(f"temperature {temperature} must be positive", "use e.g. the code's 4")
        self.alpha, self.temperature = alpha, temperature
        self.teacher: Optional[nn.ModuleDict] = None
        self._pending: Optional[dict[str, Tensor]] = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and not isinstance(pl_module, DiscoveryModule):
            raise self.fail(f"it needs a DiscoveryModule (its backbone, cosine classifier and views), got "
                            f"{type(pl_module).__name__}", "train a reglab.tasks.DiscoveryModule")
        super().setup(trainer, pl_module, stage)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # here, not in setup: DDP has broadcast rank 0's weights, so every rank copies the same model;
        # a resumed fit has restored its checkpoint by now, whose saved teacher is waiting in _pending
        if self.teacher is None:
            teacher = nn.ModuleDict({"backbone": copy.deepcopy(pl_module.backbone),
                                     "classifier": copy.deepcopy(pl_module.classifier)})
            self.teacher = teacher.requires_grad_(False)
            if self._pending is not None:
                self.load_state_dict(self._pending)
        self.teacher.to(pl_module.device).eval()

    @torch.no_grad()
    def teacher_logits(self, inputs: Tensor, module: DiscoveryModule) -> Tensor:
        """The known-class model's logits over the known classes (cosine / student temperature)."""
        features = F.normalize(self.teacher["backbone"](inputs), dim=-1)
        weights = F.normalize(self.teacher["classifier"].weight[: module.hparams.num_known_classes], dim=-1)
        return features @ weights.T / module.hparams.student_temperature

    def loss_terms(self, out: StepOutput, module: L.LightningModule) -> dict[str, Tensor]:
        if out.extras.get("views") != 2:
            return {}
        unlabelled = ~out.extras["labelled"]
        if not unlabelled.any():
            return {"kd": out.logits.sum() * 0.0}
        inputs = torch.cat([out.batch["view1"], out.batch["view2"]])
        teacher = self.teacher_logits(inputs, module)
        kd = class_relation_kd(teacher[unlabelled], out.logits[unlabelled], module.hparams.num_known_classes,
                               self.temperature)
        return {"kd": self.alpha * kd.mean()}

    def state_dict(self) -> dict[str, Any]:
        if self.teacher is None:
            return {}
        return {f"teacher.{key}": value.detach().cpu().clone() for key, value in self.teacher.state_dict().items()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        weights = {key.removeprefix("teacher."): value for key, value in state_dict.items() if key.startswith("teacher.")}
        if not weights:
            return
        if self.teacher is None:  # applied when the fit's start builds the teacher
            self._pending = state_dict
            return
        self.teacher.load_state_dict(weights)
        self._pending = None
