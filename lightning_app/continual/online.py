"""Online continual learning metrics: anytime accuracy over a stream and its area under the curve.

In an online stream (``reglab.datamodules.SiBlurryDataModule``) the model may be asked for a prediction
at any time, so it is evaluated during the single pass, as in the Si-Blurry protocol (official
code KHU-AGI/Si-Blurry, ``methods/_trainer.py``):

* every ``eval_period`` training samples, the test accuracy on the test samples of the classes
  seen so far, predicting among the seen classes only: a(n_k), n_k ≈ k · eval_period;
* ``A_auc = (1/K) Σ_k a(n_k)``, the area under that curve divided by its length (the paper's
  ``Σ_k a(k·Δn)·Δn`` normalised by the stream length, exactly what the official code reports);
* ``A_last``: the same accuracy after the last sample.

The Si-Blurry protocol also restricts training to the classes exposed so far (the official
trainer adds −inf to the logits of unseen classes for every method); :class:`AnytimeAccuracy`
does so through ``ClassificationModule.active_classes`` when ``mask_unseen_classes`` is on, so
techniques and baselines train under the same rule.

Example:
    >>> area_under_accuracy([0.2, 0.4, 0.9])
    0.5
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Subset


def area_under_accuracy(accuracies: list[float]) -> float:
    """A_auc: the mean of accuracies evaluated at equally spaced points of the stream."""
    if not accuracies:
        raise ValueError("area_under_accuracy: no evaluation point; lower eval_period or stream more samples.")
    return float(sum(accuracies) / len(accuracies))


@torch.no_grad()
def seen_class_accuracy(module: L.LightningModule, dataset: Any, seen: Tensor, batch_size: int) -> float:
    """Accuracy on the samples of ``dataset`` whose class is marked in ``seen`` (a ``(C,)`` bool mask),
    predicting among the seen classes only. ``dataset`` has ``targets`` and yields dict samples."""
    positions = torch.isin(dataset.targets, seen.nonzero().flatten().cpu()).nonzero().flatten().tolist()
    if not positions:
        return 0.0
    was_training = module.training
    module.eval()
    correct = 0
    try:
        for batch in DataLoader(Subset(dataset, positions), batch_size=batch_size, shuffle=False):
            logits = module(batch["input"].to(module.device)).float()
            logits = logits.masked_fill(~seen.to(logits.device), float("-inf"))
            correct += int((logits.argmax(-1).cpu() == batch["target"]).sum())
    finally:
        module.train(was_training)
    return correct / len(positions)


class AnytimeAccuracy(L.Callback):
    """Records the anytime accuracy curve of a single online fit, A_auc and A_last (module docstring).

    Evaluates on ``trainer.datamodule.test_dataset`` (every rank evaluates all of it, so all ranks
    agree without a gather) and logs ``online/acc`` at each point and ``online/A_auc``,
    ``online/A_last`` at the end of the fit (to the loggers when the trainer has one). Its state
    (seen classes, samples counted, the curve) is checkpointed, so a resumed stream continues the
    same curve.

    Args:
        eval_period: training samples (over all ranks) between two evaluations.
        mask_unseen_classes: set the module's ``active_classes`` to the classes seen so far before
            every step (the Si-Blurry protocol); needs a module with an ``active_classes`` buffer.

    Attributes:
        samples, accuracies: the curve (samples seen at each evaluation, accuracy there).
        last_accuracy: A_last after the fit (``None`` before).

    Example:
        >>> curve = AnytimeAccuracy(eval_period=100)
    """

    def __init__(self, eval_period: int = 100, mask_unseen_classes: bool = True) -> None:
        if eval_period < 1:
            raise ValueError(f"AnytimeAccuracy: eval_period must be at least 1 sample, got {eval_period}.")
        self.eval_period, self.mask_unseen_classes = eval_period, mask_unseen_classes
        self.seen: Tensor | None = None
        self.samples_seen = 0
        self.samples: list[int] = []
        self.accuracies: list[float] = []
        self.last_accuracy: float | None = None

    # -- Lightning hooks ------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        num_classes = getattr(trainer.datamodule, "num_classes", None)
        if num_classes is None or not hasattr(trainer.datamodule, "test_dataset"):
            raise ValueError(
                "AnytimeAccuracy: the DataModule must have num_classes and a test_dataset (every reglab "
                "ClassificationDataModule does); use e.g. reglab.datamodules.SiBlurryDataModule."
            )
        if self.mask_unseen_classes and not isinstance(getattr(pl_module, "active_classes", None), Tensor):
            raise ValueError(
                f"AnytimeAccuracy: mask_unseen_classes needs an `active_classes` buffer on {type(pl_module).__name__}; "
                "use reglab.tasks.ClassificationModule or set mask_unseen_classes=False."
            )
        if self.seen is None:
            self.seen = torch.zeros(num_classes, dtype=torch.bool)
        # on the module's device, so marking a batch's classes needs no host sync
        self.seen = self.seen.to(pl_module.device)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        labels = batch["target"]
        if trainer.world_size > 1:
            labels = pl_module.all_gather(labels).reshape(-1)
        self.seen[labels] = True
        if self.mask_unseen_classes:
            pl_module.active_classes.copy_(self.seen)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.samples_seen += len(batch["target"]) * trainer.world_size
        next_point = (len(self.samples) + 1) * self.eval_period
        if self.samples_seen >= next_point:
            accuracy = self._evaluate(trainer, pl_module)
            # One point per crossing, as the official trainer: the next point is the next multiple
            # of eval_period after the samples seen (a batch larger than the period skips points).
            while (len(self.samples) + 1) * self.eval_period <= self.samples_seen:
                self.samples.append(self.samples_seen)
                self.accuracies.append(accuracy)
            pl_module.log("online/acc", accuracy, on_step=True, on_epoch=False)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.last_accuracy = self._evaluate(trainer, pl_module)
        if trainer.loggers and trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(self.summary(), step=trainer.global_step)

    def _evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> float:
        data = trainer.datamodule
        with trainer.precision_plugin.forward_context():
            return seen_class_accuracy(pl_module, data.test_dataset, self.seen, data.eval_batch_size)

    # -- results --------------------------------------------------------------------------------
    def summary(self) -> dict[str, float]:
        """``{"online/A_auc", "online/A_last"}`` after the fit (no A_auc if the stream was shorter
        than ``eval_period``)."""
        if self.last_accuracy is None:
            raise RuntimeError("AnytimeAccuracy.summary: the fit has not ended yet.")
        auc = {"online/A_auc": area_under_accuracy(self.accuracies)} if self.accuracies else {}
        return {**auc, "online/A_last": self.last_accuracy}

    def state_dict(self) -> dict[str, Any]:
        return {"seen": self.seen.cpu(), "samples_seen": self.samples_seen, "samples": torch.tensor(self.samples),
                "accuracies": torch.tensor(self.accuracies, dtype=torch.float64)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.seen = state_dict["seen"].clone()
        self.samples_seen = int(state_dict["samples_seen"])
        self.samples = state_dict["samples"].tolist()
        self.accuracies = state_dict["accuracies"].tolist()
