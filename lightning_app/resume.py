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

A checkpoint saved at an ordinary epoch end has a second problem: Lightning saves it inside
``on_train_epoch_end``, where the epoch counts as processed but not completed, and the batch
counter still holds the finished epoch's batches. Resumed with ``max_steps`` set (Lightning then
always treats the fit as restarting), that state makes Lightning train the next epoch's first
batch as one more batch of the old epoch and then skip to the epoch after next. RunCheckpoint
stores (and, for older checkpoints, reads) such a checkpoint as what it is: that epoch completed,
the next one not started — which Lightning resumes exactly with or without ``max_steps``.

It writes every checkpoint to ``<name>.partial`` and renames it into place, so a process killed
while saving (Ctrl-C, SIGKILL) leaves the previous ``last.ckpt`` whole.
"""

from __future__ import annotations

import os
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

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        partial = f"{filepath}.partial"
        super()._save_checkpoint(trainer, partial)
        if trainer.is_global_zero:
            os.replace(partial, filepath)
        self._last_checkpoint_saved = filepath

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(trainer, pl_module, checkpoint)
        mark_epoch_completed(checkpoint)

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(trainer, pl_module, checkpoint)
        if trainer.state.fn == "fit":
            check_exact_resume(checkpoint, trainer.ckpt_path)
            mark_epoch_completed(checkpoint)  # Lightning restores the loops from this dict afterwards


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


def _fit_progress(checkpoint: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """(epoch progress, batch progress) of the fit loop in a checkpoint, if it has them."""
    loops = checkpoint.get("loops", {}).get("fit_loop", {})
    epochs, batches = loops.get("epoch_progress"), loops.get("epoch_loop.batch_progress")
    return (epochs, batches) if epochs and batches else None


def _saved_in_epoch_end(epochs: dict[str, Any]) -> bool:
    current = epochs["current"]
    return current["processed"] == current["started"] and current["completed"] == current["processed"] - 1


def mark_epoch_completed(checkpoint: dict[str, Any]) -> None:
    """Rewrite a checkpoint saved at the end of a whole epoch as "epoch completed, next not started".

    This is the state Lightning itself reaches right after ``on_train_epoch_end``; the fit loop
    resumes it by starting the next epoch (see the module docstring for why the saved state is not).
    """
    progress = _fit_progress(checkpoint)
    if progress is None or not _saved_in_epoch_end(progress[0]) or not progress[1]["is_last_batch"]:
        return
    epochs, batches = progress
    for scope in ("total", "current"):
        epochs[scope]["completed"] = epochs[scope]["processed"]
    batches["current"] = dict.fromkeys(batches["current"], 0)
    batches["is_last_batch"] = False


def check_exact_resume(checkpoint: dict[str, Any], path: Any = None) -> None:
    """Refuse a checkpoint saved at the end of an epoch that a stop cut short.

    Such a checkpoint (Lightning's own ModelCheckpoint writes one when ``max_steps`` or
    ``should_stop`` ends a fit mid-epoch) marks the epoch as finished although only some of its
    batches were trained on, and the epoch's end hooks ran on that partial epoch.
    """
    progress = _fit_progress(checkpoint)
    if progress is None:
        return
    epochs, batches = progress[0]["current"], progress[1]
    if _saved_in_epoch_end(progress[0]) and not batches["is_last_batch"]:
        raise InexactResumeError(
            f"{path or 'the checkpoint'} was saved when the fit stopped in the middle of epoch "
            f"{epochs['completed']} (after {batches['current']['completed']} of its batches, step "
            f"{checkpoint.get('global_step')}), by a checkpoint callback that marks that epoch as done: "
            "resuming would skip the rest of the epoch and not match an uninterrupted run. Fix: resume "
            "from a checkpoint saved by reglab.resume.RunCheckpoint (last.ckpt of a reglab run), or "
            "from one saved at an epoch end, or start the run anew."
        )
