"""The standard evaluation metrics of a classification run: accuracy, per-class accuracy, ECE.

Accuracy is the headline number of most claims in ``docs/techniques.md``; per-class accuracy is
what long-tail techniques (tail-class accuracy) are judged on; expected calibration error is the
second claim of PS-KD and the usual side effect of label smoothing and self-distillation.
"""

from __future__ import annotations

from torch import Tensor
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassCalibrationError

ACCURACY = "acc"
PER_CLASS_ACCURACY = "acc_per_class"
CALIBRATION_ERROR = "ece"


def classification_metrics(num_classes: int, prefix: str) -> MetricCollection:
    """Build overall accuracy, per-class accuracy and expected calibration error.

    The collection's keys are ``<prefix>acc``, ``<prefix>acc_per_class`` and ``<prefix>ece``.
    Feed it ``(N, C)`` logits or probabilities and ``(N,)`` targets: calibration error needs
    confidences, so class-index predictions are not accepted here.

    ``<prefix>acc_per_class`` is a ``(C,)`` vector, which ``LightningModule.log`` refuses; pass it
    through :func:`per_class_accuracy_dict` before logging. ECE uses 15 equal-width bins and the
    L1 norm, the setting of Guo et al. (2017) that calibration claims are usually quoted in.

    Args:
        num_classes: number of classes ``C``.
        prefix: prepended to every key, e.g. ``"val/"``.

    Example:
        >>> import torch
        >>> metrics = classification_metrics(num_classes=3, prefix="val/")
        >>> logits = torch.tensor([[4.0, 0.0, 0.0], [0.0, 4.0, 0.0], [0.0, 4.0, 0.0]])
        >>> metrics.update(logits, torch.tensor([0, 1, 2]))
        >>> results = metrics.compute()
        >>> per_class = results.pop("val/acc_per_class")
        >>> scalars = {**results, **per_class_accuracy_dict(per_class, prefix="val/")}
        >>> {name: round(value.item(), 4) for name, value in sorted(scalars.items())}
        {'val/acc': 0.6667, 'val/acc_class_0': 1.0, 'val/acc_class_1': 1.0, 'val/acc_class_2': 0.0, 'val/ece': 0.298}
    """
    return MetricCollection(
        {
            ACCURACY: MulticlassAccuracy(num_classes=num_classes, average="micro"),
            PER_CLASS_ACCURACY: MulticlassAccuracy(num_classes=num_classes, average=None),
            CALIBRATION_ERROR: MulticlassCalibrationError(
                num_classes=num_classes, n_bins=15, norm="l1"
            ),
        },
        prefix=prefix,
    )


def per_class_accuracy_dict(per_class_accuracy: Tensor, prefix: str) -> dict[str, Tensor]:
    """Split a ``(C,)`` per-class accuracy vector into loggable scalars ``<prefix>acc_class_<i>``.

    Example:
        >>> import torch
        >>> per_class_accuracy_dict(torch.tensor([0.5, 1.0]), prefix="test/")
        {'test/acc_class_0': tensor(0.5000), 'test/acc_class_1': tensor(1.)}
    """
    return {
        f"{prefix}acc_class_{class_index}": accuracy
        for class_index, accuracy in enumerate(per_class_accuracy)
    }
