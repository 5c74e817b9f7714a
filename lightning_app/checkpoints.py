"""Checkpoints that a fit resumes from exactly, whatever stopped it.

When a fit stops in the middle of an epoch (``max_steps``, ``max_time``, a callback setting
``trainer.should_stop``, SIGTERM), Lightning still ends that epoch: it counts the epoch as
processed and runs every ``on_train_epoch_end`` hook on the partial epoch, and only then does
:class:`~lightning.pytorch.callbacks.ModelCheckpoint` save. Resuming from that checkpoint starts
the *next* epoch: the rest of the stopped epoch is never trained on, so a resumed run ends at a
different step with different weights than an uninterrupted one.

:class:`RunCheckpoint` saves at the stopping step instead, in ``on_train_batch_end`` — the same
place Lightning's ``every_n_train_steps`` checkpoints are written, which Lightning resumes batch
for batch — and so the epoch-end save of that step is skipped. It also refuses to resume from a
checkpoint written the other way, saying what to resume from instead.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint


class InexactResumeError(RuntimeError):
    """The checkpoint cannot be resumed from so that the run continues as if never stopped."""


class RunCheckpoint(ModelCheckpoint):
    """:class:`~lightning.pytorch.callbacks.ModelCheckpoint` whose checkpoints resume exactly.

    Takes ModelCheckpoint's arguments. When the fit is about to stop after the current batch,
    before the end of the epoch, the checkpoint (``last`` when ``save_last``, else top-k) is
    saved right there; see the module docstring for why.

    Example:
        >>> import tempfile
        >>> from lightning.pytorch.demos.boring_classes import BoringModel
        >>> folder = tempfile.mkdtemp()
        >>> trainer = L.Trainer(max_steps=7, limit_train_batches=5, limit_val_batches=0, logger=False,
        ...                     enable_progress_bar=False, enable_model_summary=False,
        ...                     callbacks=[RunCheckpoint(dirpath=folder, save_last=True)])
        >>> trainer.fit(BoringModel())
        >>> import torch
        >>> state = torch.load(f"{folder}/last.ckpt", weights_only=False)["loops"]["fit_loop"]
        >>> state["epoch_progress"]["current"]["processed"]   # epoch 1 is not marked done: it resumes mid-epoch
        1
    """

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self._should_skip_saving_checkpoint(trainer) or not stops_mid_epoch(trainer):
            return
        candidates = self._monitor_candidates(trainer)
        if self.save_last:
            self._save_last_checkpoint(trainer, candidates)
        else:
            self._save_topk_checkpoint(trainer, candidates)

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        if trainer.state.fn == "fit":
            check_exact_resume(checkpoint, trainer.ckpt_path)


def stops_mid_epoch(trainer: L.Trainer) -> bool:
    """Whether the fit loop ends after the batch that just finished, before its epoch's end.

    Mirrors the conditions Lightning's loops check after ``on_train_batch_end``.
    """
    fit_loop = trainer.fit_loop
    if fit_loop.epoch_loop._num_ready_batches_reached():
        return False  # the epoch ends anyway: an ordinary epoch-end checkpoint
    max_steps = trainer.max_steps
    return (
        (max_steps != -1 and trainer.global_step >= max_steps)
        or (trainer.should_stop and fit_loop._can_stop_early)
        or bool(trainer.received_sigterm)
    )


def check_exact_resume(checkpoint: dict[str, Any], path: Any = None) -> None:
    """Refuse a checkpoint saved at the end of an epoch that a stop cut short.

    Such a checkpoint (Lightning's own ModelCheckpoint writes one when ``max_steps`` or
    ``should_stop`` ends a fit mid-epoch) marks the epoch as finished although only some of its
    batches were trained on, and the epoch's end hooks ran on that partial epoch.
    """
    loops = checkpoint.get("loops", {}).get("fit_loop", {})
    epochs, batches = loops.get("epoch_progress", {}).get("current"), loops.get("epoch_loop.batch_progress")
    if not epochs or not batches:
        return
    saved_at_epoch_end = epochs["processed"] == epochs["started"] and epochs["completed"] == epochs["processed"] - 1
    if saved_at_epoch_end and not batches["is_last_batch"]:
        raise InexactResumeError(
            f"{path or 'the checkpoint'} was saved when the fit stopped in the middle of epoch "
            f"{epochs['completed']} (after {batches['current']['completed']} of its batches, step "
            f"{checkpoint.get('global_step')}), by a checkpoint callback that marks that epoch as done: "
            "resuming would skip the rest of the epoch and not match an uninterrupted run. Fix: resume "
            "from a checkpoint saved by reglab.checkpoints.RunCheckpoint (last.ckpt of a reglab run), or "
            "from one saved at an epoch end, or start the run anew."
        )
