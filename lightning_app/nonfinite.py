"""Stop a fit whose loss becomes NaN or infinite, before a checkpoint takes the bad weights.

A non-finite loss makes every later weight non-finite, yet Lightning trains on, and checkpointing
would replace the last good ``last.ckpt`` with a useless one. :class:`NonFiniteGuard` records, on
the device and without a host sync, the first step at which the total loss or any logged term
was not finite, and looks at the record (one sync) every ``log_every_n_steps`` steps, at every
epoch end and before any checkpoint is written. Then it raises :class:`NonFiniteLossError`, which
names the step, the epoch, the term that went bad first and the checkpoint that is kept.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import Tensor


class NonFiniteLossError(RuntimeError):
    """The training loss (or one of its terms) became NaN or infinite."""


class NonFiniteGuard(L.Callback):
    """Stops the fit at the first NaN/inf training loss or loss term, keeping the last finite checkpoint.

    It reads ``outputs["loss"]`` and, from :class:`~reglab.mixins.RegularizedMixin`, the logged
    terms (``outputs["terms"]``) of every training step. The ``reglab`` command adds it; with the
    Python API, put it in ``Trainer(callbacks=[...])`` (Lightning runs checkpoint callbacks after
    all others, so the guard always sees a step before any checkpoint of it is saved).

    Args:
        check_every_n_steps: how often to read the device-side record (one host sync); default
            the trainer's ``log_every_n_steps``. Epoch ends and checkpoint saves always check.

    Example:
        >>> from lightning.pytorch.demos.boring_classes import BoringModel
        >>> class Diverging(BoringModel):
        ...     def training_step(self, batch, batch_idx):
        ...         loss = super().training_step(batch, batch_idx)["loss"]
        ...         return loss * float("inf") if self.global_step >= 3 else loss
        >>> trainer = L.Trainer(max_steps=10, logger=False, enable_checkpointing=False,
        ...                     enable_progress_bar=False, enable_model_summary=False,
        ...                     callbacks=[NonFiniteGuard(check_every_n_steps=2)])
        >>> try:
        ...     trainer.fit(Diverging())
        ... except NonFiniteLossError as error:
        ...     print(str(error).split(";")[0])
        train/loss became non-finite at step 4 (epoch 0)
    """

    def __init__(self, check_every_n_steps: int | None = None) -> None:
        self.check_every_n_steps = check_every_n_steps
        self._names: list[str] = []
        # per logged name, on the device: step and epoch of its first non-finite value (-1: none yet)
        self._first_step: Tensor | None = None
        self._first_epoch: Tensor | None = None
        self._last_saved_step: int | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._names, self._first_step, self._first_epoch = [], None, None

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        values = _logged_values(outputs)
        if not values:
            return
        if list(values) != self._names:  # the first step, or a term appeared: the record grows
            self._resize(list(values), next(iter(values.values())).device)
        assert self._first_step is not None and self._first_epoch is not None
        stacked = torch.stack([value.detach().float().reshape(()) for value in values.values()])
        newly_bad = ~torch.isfinite(stacked) & (self._first_step < 0)
        # python scalars go to the kernel as arguments: no host-to-device copy, no sync
        self._first_step = torch.where(newly_bad, trainer.global_step, self._first_step)
        self._first_epoch = torch.where(newly_bad, trainer.current_epoch, self._first_epoch)
        every = self.check_every_n_steps or trainer.log_every_n_steps
        if every and trainer.global_step % every == 0:
            self.check(trainer)

    def _resize(self, names: list[str], device: torch.device) -> None:
        old = {}
        if self._first_step is not None and self._first_epoch is not None:
            old = {name: (self._first_step[i], self._first_epoch[i]) for i, name in enumerate(self._names)}
        none = torch.full((), -1, dtype=torch.long, device=device)
        self._first_step = torch.stack([old.get(name, (none, none))[0] for name in names])
        self._first_epoch = torch.stack([old.get(name, (none, none))[1] for name in names])
        self._names = names

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.check(trainer)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        # raising here aborts the save before the file is written: the previous checkpoint stays
        self.check(trainer)
        self._last_saved_step = trainer.global_step

    def check(self, trainer: L.Trainer) -> None:
        """Raise :class:`NonFiniteLossError` if a non-finite value was recorded (one host sync).

        Under DDP every rank decides together (one all-reduce), so no rank stops while the
        others wait for it in the next collective.
        """
        steps = self._first_step.tolist() if self._first_step is not None else []
        epochs = self._first_epoch.tolist() if self._first_epoch is not None else []
        bad = {name: (step, epoch) for name, step, epoch in zip(self._names, steps, epochs) if step >= 0}
        if not trainer.strategy.reduce_boolean_decision(bool(bad), all=False):
            return
        if not bad:
            raise NonFiniteLossError(
                f"the training loss became non-finite on another rank (this is rank {trainer.global_rank}); "
                "that rank's message names the step and the term."
            )
        step, epoch = min(bad.values())
        first = [name for name, where in bad.items() if where == (step, epoch)]
        terms = [name for name in first if name != "train/loss"] or first  # the total goes bad with its term
        raise NonFiniteLossError(
            f"{', '.join(terms)} became non-finite at step {step} (epoch {epoch}); training stopped. "
            f"{self._kept_checkpoint(trainer)} Fix: lower the learning rate or the weight of the term "
            "that diverged, then resume from that checkpoint (reglab: --ckpt_path last) or start anew."
        )

    def _kept_checkpoint(self, trainer: L.Trainer) -> str:
        # every save after the first non-finite step was refused, so what is on disk is finite
        paths = [
            next((path for path in (callback.last_model_path, callback.best_model_path) if path and Path(path).is_file()), None)
            for callback in trainer.checkpoint_callbacks
            if isinstance(callback, ModelCheckpoint)
        ]
        paths = [path for path in paths if path]
        if not paths:
            return "No checkpoint had been saved before it."
        when = f" (saved at step {self._last_saved_step})" if self._last_saved_step is not None else ""
        return f"The last finite checkpoint{when} is kept: {', '.join(paths)}."


def _logged_values(outputs: Any) -> dict[str, Tensor]:
    """``{"train/loss": total, "train/<term>": value, ...}`` from a training step's outputs."""
    if isinstance(outputs, Tensor):
        return {"train/loss": outputs}
    if not isinstance(outputs, Mapping) or not isinstance(outputs.get("loss"), Tensor):
        return {}
    terms = outputs.get("terms") or {}
    return {"train/loss": outputs["loss"], **{f"train/{name}": value for name, value in terms.items()}}
