"""Semantic segmentation: a dense backbone by name, a 1×1 convolution head, and the step contract."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex
from torchmetrics.segmentation import DiceScore

from reglab.metrics import NoisyLabelMemorization
from reglab.mixins import RegularizedMixin, StepOutput
from reglab.models import create_backbone
from reglab.step import cross_entropy_per_sample
from reglab.tasks.classification import check_module_fits_data
from reglab.tasks.metric_hooks import TaskMetricsMixin

#: the label of pixels that count in no loss and no metric (the PASCAL VOC convention)
IGNORE_INDEX = 255
MEAN_IOU, PER_CLASS_IOU, PIXEL_ACCURACY, DICE = "miou", "iou_per_class", "pixel_acc", "dice"


def dense_cross_entropy_per_sample(logits: Tensor, target: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Mean pixel cross-entropy per image ``(N,)`` of ``(N, C, H, W)`` logits, in fp32.

    ``target`` is ``(N, H, W)`` class indices (pixels equal to ``ignore_index`` do not count) or
    ``(N, C, H, W)`` probabilities (pixels whose probabilities are all zero do not count). An image
    without a counted pixel has loss 0. Soft targets go through
    :func:`reglab.step.cross_entropy_per_sample` with the classes moved last, so the fused kernel
    serves dense targets too.

    Example:
        >>> logits = torch.zeros(1, 2, 1, 2)
        >>> dense_cross_entropy_per_sample(logits, torch.tensor([[[0, 255]]]))   # one pixel counts: ln 2
        tensor([0.6931])
    """
    if target.dim() == logits.dim():
        per_pixel = cross_entropy_per_sample(logits.movedim(1, -1), target.movedim(1, -1).to(logits.dtype))
        counted = target.sum(dim=1) > 0
    else:
        per_pixel = F.cross_entropy(logits.float(), target, ignore_index=ignore_index, reduction="none")
        counted = target != ignore_index
    per_pixel = per_pixel.float() * counted
    return per_pixel.flatten(1).sum(1) / counted.flatten(1).sum(1).clamp_min(1)


class ForegroundDice(DiceScore):
    """torchmetrics' :class:`~torchmetrics.segmentation.DiceScore` of the foreground classes (class 0
    is the background), from ``(N, C, H, W)`` logits and ``(N, H, W)`` class indices, skipping pixels
    labelled ``ignore_index`` (which ``DiceScore`` cannot do itself: they become all-zero one-hot
    vectors in both the prediction and the target, so they count in no class).

    Global over the split (each class's ``2 TP / (2 TP + FP + FN)`` over all its pixels, as the
    IoU here), then the mean over the foreground classes present in the targets or the predictions.
    """

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX) -> None:
        super().__init__(num_classes, include_background=False, average="macro", aggregation_level="global",
                         input_format="one-hot")
        self.ignore_index = ignore_index

    def update(self, logits: Tensor, target: Tensor) -> None:
        counted = (target != self.ignore_index).unsqueeze(1)
        predicted = F.one_hot(logits.argmax(1), self.num_classes).movedim(-1, 1) * counted
        labelled = F.one_hot(torch.where(counted[:, 0], target, 0), self.num_classes).movedim(-1, 1) * counted
        super().update(predicted, labelled)


def _has_labelled_pixel(target: Tensor, ignore_index: int) -> Tensor:
    """``(N,)`` bool: which images of an ``(N, H, W)`` index or ``(N, C, H, W)`` probability target have
    a pixel that counts (see :func:`dense_cross_entropy_per_sample`)."""
    counted = target.sum(dim=1) > 0 if target.dim() == 4 else target != ignore_index
    return counted.flatten(1).any(1)


def segmentation_metrics(num_classes: int, prefix: str, ignore_index: int = IGNORE_INDEX) -> MetricCollection:
    """Mean IoU, per-class IoU, pixel accuracy and Dice over a whole split, from ``(N, C, H, W)`` logits.

    IoU is computed from the split's accumulated confusion matrix (intersection over union of
    all its pixels per class, the PASCAL VOC convention ADELE reports); the mean is over the
    classes present in the targets or the predictions, background included. Dice is
    :class:`ForegroundDice`: the same global counts, the mean over the foreground classes only
    (the polyp-segmentation convention FPGM reports). Keys: ``<prefix>miou``,
    ``<prefix>iou_per_class`` (a ``(C,)`` vector), ``<prefix>pixel_acc`` and ``<prefix>dice``.

    Example:
        >>> metrics = segmentation_metrics(3, prefix="val/")
        >>> logits = torch.zeros(1, 3, 1, 4)
        >>> logits[0, [0, 1, 1, 2], 0, torch.arange(4)] = 1.0          # predicts 0, 1, 1, 2
        >>> metrics.update(logits, torch.tensor([[[0, 1, 2, 2]]]))
        >>> {name: round(value.item(), 4) for name, value in sorted(metrics.compute().items()) if value.dim() == 0}
        {'val/dice': 0.6667, 'val/miou': 0.6667, 'val/pixel_acc': 0.75}
    """
    return MetricCollection(
        {
            DICE: ForegroundDice(num_classes, ignore_index),
            MEAN_IOU: MulticlassJaccardIndex(num_classes, average="macro", ignore_index=ignore_index),
            PER_CLASS_IOU: MulticlassJaccardIndex(num_classes, average="none", ignore_index=ignore_index),
            PIXEL_ACCURACY: MulticlassAccuracy(num_classes, average="micro", ignore_index=ignore_index),
        },
        prefix=prefix,
    )


class SegmentationModule(TaskMetricsMixin, RegularizedMixin, L.LightningModule):
    """Semantic segmentation with a dense backbone, ready for every technique.

    The contract for dense prediction: ``forward(x)`` gives ``(N, C, H, W)`` logits;
    :meth:`forward_step` a :class:`StepOutput` with ``logits`` ``(N, C, H, W)``, ``target`` and
    ``labels`` ``(N, H, W)`` (the batch's mask), ``features`` the per-pixel features the head reads
    ``(N, D, H, W)``, ``extras["bottleneck"]`` the backbone's coarsest features when it has them,
    ``index`` and ``batch``; :meth:`task_loss` the per-image mean pixel cross-entropy ``(N,)``
    (:func:`dense_cross_entropy_per_sample`, hard or soft targets, ``ignore_index`` skipped),
    scaled so that the batch's mean is the mean over its labelled images: an image without a
    labelled pixel (an unlabelled scene of a semi-supervised setting) takes no part in it.

    Logs ``val/miou``, ``val/pixel_acc``, ``val/dice``, the same for ``test/``, and per-class test IoU
    ``test/iou_class_<c>`` (``c`` the class index: 0 background, ``d + 1`` digit ``d`` on the
    scenes); when training batches carry ``clean_target`` (noisy masks), also the share of
    wrongly-labelled training pixels predicted as their noisy label (``train/memorized``) and as
    their clean label (``train/corrected``), over each epoch's training steps.

    Args:
        backbone: a dense backbone's name for :func:`reglab.models.create_backbone` (``"unet"``).
        num_classes, input_shape: filled from the DataModule by the ``reglab`` CLI; required when
            building the module in Python.
        backbone_kwargs: passed to the backbone factory (e.g. ``{"channels": [16, 32, 64]}``).
        lr, weight_decay: the default Adam optimizer's; a config's ``optimizer:`` replaces it.
        ignore_index: target value of pixels that count in neither loss nor metrics.

    Example:
        >>> module = SegmentationModule(num_classes=11, input_shape=(1, 32, 32))
        >>> module(torch.zeros(2, 1, 32, 32)).shape
        torch.Size([2, 11, 32, 32])
    """

    provides = frozenset({"logits", "features", "index"})
    per_class_metric, per_class_name = PER_CLASS_IOU, "iou_class"

    def __init__(
        self,
        backbone: str = "unet",
        num_classes: int | None = None,
        input_shape: Sequence[int] | None = None,
        backbone_kwargs: dict[str, Any] | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        ignore_index: int = IGNORE_INDEX,
    ) -> None:
        super().__init__()
        if num_classes is None or input_shape is None:
            raise ValueError(
                "SegmentationModule needs num_classes and input_shape: pass them (e.g. from "
                "datamodule.num_classes / datamodule.input_shape), or run through `reglab`, which "
                "fills them from a reglab DataModule"
            )
        if 0 <= ignore_index < num_classes:
            raise ValueError(
                f"SegmentationModule: ignore_index={ignore_index} is one of the {num_classes} classes, so that class"
                f" would never be trained or scored. Fix: use an index outside [0, {num_classes}) such as 255."
            )
        self.save_hyperparameters()
        self.backbone = create_backbone(backbone, input_shape, **dict(backbone_kwargs or {}))
        if not getattr(self.backbone, "dense", False):
            raise ValueError(
                f"SegmentationModule: backbone {backbone!r} gives one feature vector per image, not per pixel."
                " Fix: use a dense backbone such as 'unet'."
            )
        self.head = nn.Conv2d(self.backbone.feature_dim, num_classes, 1)
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.val_metrics = segmentation_metrics(num_classes, "val/", ignore_index)
        self.test_metrics = segmentation_metrics(num_classes, "test/", ignore_index)
        self.memorization = NoisyLabelMemorization()

    def setup(self, stage: str) -> None:
        check_module_fits_data(self, self.num_classes, self.hparams.input_shape)

    def features_and_logits(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """``(per-pixel features, logits, bottleneck or None)``."""
        if hasattr(self.backbone, "forward_with_bottleneck"):
            features, bottleneck = self.backbone.forward_with_bottleneck(x)
        else:
            features, bottleneck = self.backbone(x), None
        return features, self.head(features), bottleneck

    def forward(self, x: Tensor) -> Tensor:
        return self.features_and_logits(x)[1]

    def forward_step(self, batch: dict[str, Any]) -> StepOutput:
        features, logits, bottleneck = self.features_and_logits(batch["input"])
        extras = {} if bottleneck is None else {"bottleneck": bottleneck}
        return StepOutput(
            logits=logits, target=batch["target"], labels=batch["target"], features=features,
            index=batch.get("index"), batch=batch, extras=extras,
        )

    def task_loss(self, out: StepOutput) -> Tensor:
        per_image = dense_cross_entropy_per_sample(out.logits, out.target, self.ignore_index)
        # a batch's mean over its labelled images (semi-supervised batches mix in unlabelled ones,
        # whose loss is 0): scaled so, a batch with 2 labelled images of 16 trains as strongly as one of 16
        labelled = _has_labelled_pixel(out.target, self.ignore_index)
        return per_image * (len(per_image) / labelled.sum().clamp_min(1))

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        """Per-pixel class probabilities ``(N, C, H, W)``."""
        return self.forward_step(batch).logits.softmax(1)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)


def prediction_grid(model: L.LightningModule, datamodule: L.LightningDataModule, num_images: int = 6) -> Any:
    """A matplotlib figure of the first ``num_images`` test images: per column the input, the ground
    truth and ``model``'s argmax prediction (one colour per class, background black, ignored pixels
    white). The ``fit`` claims protocol draws it per arm when a claim names it in ``figures``.

    Example:
        >>> from reglab.datamodules import DigitScenesDataModule
        >>> data = DigitScenesDataModule(num_train=4, num_val=2, num_test=3)
        >>> data.setup()
        >>> figure = prediction_grid(SegmentationModule(num_classes=11, input_shape=(1, 32, 32)), data, 3)
        >>> len(figure.axes)
        9
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batch = next(iter(datamodule.test_dataloader()))
    images, target = batch["input"][:num_images], batch["target"][:num_images]
    was_training = model.training
    model.eval()
    with torch.no_grad():
        prediction = model(images.to(model.device)).argmax(1).cpu()
    model.train(was_training)
    num_classes = model.num_classes
    # class c at c / (num_classes - 1) of the map: background (0) black, each digit its own colour
    colours = plt.get_cmap("nipy_spectral", num_classes)
    colours.set_over("white")
    shown = {"input": images[:, 0].numpy(), "ground truth": target.numpy(), "prediction": prediction.numpy()}
    figure, axes = plt.subplots(3, len(images), figsize=(1.4 * len(images), 4.6), squeeze=False)
    for row, (name, maps) in zip(axes, shown.items()):
        row[0].set_ylabel(name)
        for ax, values in zip(row, maps):
            if name == "input":
                ax.imshow(values, cmap="gray")
            else:
                ax.imshow(values, cmap=colours, vmin=0, vmax=num_classes - 1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
    figure.tight_layout(rect=(0, 0, 1, 0.93))
    return figure
