"""SWA — stochastic weight averaging (Izmailov et al., UAI 2018), a baseline.

From a start epoch on, the weights are averaged with equal weight, once per epoch as in the paper
(or every ``every_n_steps`` optimizer steps):

    theta_swa <- theta_swa + (theta - theta_swa) / (n + 1),     n <- n + 1

which after n updates is exactly the mean of the n snapshots. BatchNorm statistics are not
averaged: as the paper prescribes (and ``torch.optim.swa_utils.update_bn`` implements), the
running mean and variance of the averaged weights are recomputed with one pass over the training
data, in train mode with cumulative averaging, before the average is evaluated or exported, and
only when it changed since the last pass (:func:`reglab.averaging.recompute_batchnorm_statistics`).
Under DDP each rank runs the pass on its shard and the statistics are averaged over ranks. The
learning rate is left to the module's optimizer: the paper's constant or cyclical SWA schedule is
a scheduler choice, not part of the average.

Works with any LightningModule. For the BatchNorm pass it calls ``forward_step(batch)`` when the
module has one (the step contract), else ``module(batch[0])`` for tuple batches or
``module(batch)``; batches come from ``datamodule.train_dataloader()`` (a fresh loader), else the
trainer's training loader.

Method card (what it does, when it helps, what it costs): ``swa.card.yaml`` beside this module.

Example:
    >>> from reglab.callbacks import SWA
    >>> swa = SWA(start_epoch=0.75)   # average over the last quarter of the epochs
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import Tensor

from reglab.averaging import (
    WeightAverage,
    WeightAveraging,
    is_batchnorm_statistic,
    recompute_batchnorm_statistics,
)
from reglab.technique import schedule_epochs


class SWA(WeightAveraging):
    """Equal-weight average of the weights from ``start_epoch`` on, used for evaluation and export.

    Args:
        start_epoch: first epoch whose weights enter the average: an epoch index (int), or a
            fraction of the trainer's ``max_epochs`` (float in (0, 1)).
        every_n_steps: average every n optimizer steps instead of once per epoch (the paper).
    """

    name = "swa"

    def __init__(self, start_epoch: int | float = 0.75, every_n_steps: int | None = None) -> None:
        super().__init__()
        if isinstance(start_epoch, float) and not 0.0 < start_epoch < 1.0:
            raise ValueError(f"SWA: a fractional start_epoch must be in (0, 1), got {start_epoch}")
        if isinstance(start_epoch, int) and start_epoch < 0:
            raise ValueError(f"SWA: start_epoch must be >= 0, got {start_epoch}")
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"SWA: every_n_steps must be >= 1, got {every_n_steps}")
        self.start_epoch = start_epoch
        self.every_n_steps = every_n_steps
        self.num_averaged = 0
        self.batchnorm_statistics: WeightAverage | None = None
        self._statistics_current = False
        self._first_epoch = 0

    def create_average(self, pl_module: L.LightningModule) -> WeightAverage:
        statistics = WeightAverage(pl_module, select=is_batchnorm_statistic)
        self.batchnorm_statistics = statistics if len(statistics) else None
        return WeightAverage(pl_module, select=lambda owner, attribute: not is_batchnorm_statistic(owner, attribute))

    @property
    def has_average(self) -> bool:
        return self.num_averaged > 0

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        if self.batchnorm_statistics is not None:
            self.batchnorm_statistics.to(pl_module.device)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if isinstance(self.start_epoch, float):
            self._first_epoch = int(self.start_epoch * schedule_epochs(self, trainer, None))
        else:
            self._first_epoch = self.start_epoch

    def update_average(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.every_n_steps is not None and trainer.global_step % self.every_n_steps == 0:
            self._add_to_average(trainer, pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.every_n_steps is None:
            self._add_to_average(trainer, pl_module)

    def _add_to_average(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch >= self._first_epoch:
            self.average.lerp_(1.0 / (self.num_averaged + 1))
            self.num_averaged += 1
            self._statistics_current = False

    def evaluation_weights(self, trainer: L.Trainer, pl_module: L.LightningModule) -> list[WeightAverage]:
        if self.batchnorm_statistics is None:
            return [self.average]
        if not self._statistics_current:
            self._recompute_statistics(trainer, pl_module)
        return [self.average, self.batchnorm_statistics]

    def _recompute_statistics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # The pass writes into the swapped-in statistics tensors, so the live ones stay untouched.
        statistics = self.batchnorm_statistics
        with self.average.swapped_in(), statistics.swapped_in():
            recompute_batchnorm_statistics(pl_module, _training_batches(trainer), lambda b: _forward(pl_module, b))
        if trainer.world_size > 1:
            reduced = [trainer.strategy.reduce(t, reduce_op="mean") for t in statistics.tensors]
            torch._foreach_copy_(statistics.tensors, reduced)
        self._statistics_current = True

    def extra_state(self) -> dict[str, Tensor]:
        return {"num_averaged": torch.tensor(self.num_averaged)}

    def load_extra_state(self, state: dict[str, Tensor]) -> None:
        self.num_averaged = int(state["num_averaged"])
        self._statistics_current = False


def _training_batches(trainer: L.Trainer) -> Any:
    datamodule = trainer.datamodule
    if datamodule is not None and hasattr(datamodule, "train_dataloader"):
        return datamodule.train_dataloader()
    return trainer.train_dataloader


def _forward(module: L.LightningModule, batch: Any) -> Any:
    batch = module.transfer_batch_to_device(batch, module.device, 0)
    if hasattr(module, "forward_step"):
        return module.forward_step(batch)
    return module(batch[0] if isinstance(batch, (list, tuple)) else batch)
