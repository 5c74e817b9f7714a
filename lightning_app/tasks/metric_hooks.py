"""The metric hooks reglab's task modules share: evaluation metrics per split, memorization of noisy labels."""

from __future__ import annotations

from typing import Any

from torchmetrics import MetricCollection

from reglab.step import StepOutput


class TaskMetricsMixin:
    """Updates and logs a task module's metrics; mix it in before ``RegularizedMixin``.

    The module sets ``val_metrics`` and ``test_metrics`` (``MetricCollection``\\ s with prefixes
    ``val/`` and ``test/``), ``memorization`` (:class:`~reglab.metrics.NoisyLabelMemorization`) and
    two class attributes: ``per_class_metric``, the key (without prefix) of the collection's
    ``(C,)`` per-class vector, and ``per_class_name``, the stem of its logged scalars
    (``test/<per_class_name>_<c>``). Validation logs the scalars, test also the per-class values.
    When training batches carry ``clean_target``, the share of wrongly-labelled training samples —
    pixels for dense targets — predicted as their noisy label (``train/memorized``) and as their
    clean label (``train/corrected``) is logged per epoch.
    """

    per_class_metric: str
    per_class_name: str
    val_metrics: MetricCollection
    test_metrics: MetricCollection
    memorization: Any

    def on_step_output(self, out: StepOutput, stage: str) -> None:
        if stage == "train":
            if "clean_target" in out.batch:
                # classes are dim 1 of (N, C) and of dense (N, C, H, W) logits; pixels count as samples
                predicted = out.logits.detach().argmax(1)
                self.memorization.update(predicted.flatten(), out.labels.flatten(), out.batch["clean_target"].flatten())
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
        per_class_values = values.pop(prefix + self.per_class_metric)
        self.log_dict(values)
        if per_class:
            self.log_dict({f"{prefix}{self.per_class_name}_{c}": value for c, value in enumerate(per_class_values)})
