"""Start a fit from pretrained weights: copy parts of a checkpoint into the module before training.

Fine-tuning recipes (model soups' ingredients, LEVI's frozen model, plain fine-tuning baselines)
all start from one pretrained model. ``fit --ckpt_path`` cannot express that: it *resumes* a run
(optimizer, epoch, loops), while fine-tuning starts a new run from the weights only.

:class:`PretrainedWeights` copies the entries of a checkpoint's ``state_dict`` under the given
prefixes (``backbone`` by default: the usual recipe, a new randomly initialised head) into the
module in ``setup("fit")``, before optimizers exist. On a resume, Lightning restores the run's own
checkpoint afterwards, so the resumed weights win.

The checkpoint is either a file, or the product of a pretraining config: with
``pretrain_config`` the config is fitted once, in a subprocess (its seeds and global state stay
out of this run), and the checkpoint is cached under ``cache_dir`` by the config's content hash,
so every later run, seed and arm starts from the same pretrained model. Delete the cache file to
pretrain again.

This is a plain Lightning callback, not a technique: it changes no loss and needs nothing from
the step contract.

Example:
    >>> from reglab.callbacks.fine_tuning import PretrainedWeights
    >>> start = PretrainedWeights(pretrain_config="configs/experiment/digits_pretrain.yaml")
    >>> # Trainer(callbacks=[start, ...]); list it before anything that changes the architecture
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import lightning as L

from reglab.checkpoints import copy_pretrained_weights, fitted_checkpoint, load_state_dict_file
from reglab.paths import ConfigPath


class PretrainedWeights(L.Callback):
    """Copy pretrained weights into the module when a fit starts (see the module docstring).

    Args:
        checkpoint: a Lightning checkpoint or state-dict file to start from.
        pretrain_config: instead of ``checkpoint``, a ``reglab fit`` config whose result to start
            from (fitted once, then cached).
        prefixes: the parts of the state dict to copy, e.g. ``["backbone"]`` (new head) or
            ``["backbone", "head"]`` (the whole classifier).
        cache_dir: where checkpoints of ``pretrain_config`` are cached.

    In a config file, the three paths are relative to that file (``reglab`` makes them absolute,
    :data:`reglab.paths.ConfigPath`), so a run works from any directory; the default ``cache_dir``
    is relative to the working directory, like ``runs_dir``.
    """

    #: a task sequence (``reglab fit-tasks``) starts only its first task from these weights
    starts_a_sequence_only: ClassVar[bool] = True

    def __init__(
        self,
        checkpoint: ConfigPath | None = None,
        pretrain_config: ConfigPath | None = None,
        prefixes: Sequence[str] = ("backbone",),
        cache_dir: ConfigPath = "runs/pretrained",
    ) -> None:
        if (checkpoint is None) == (pretrain_config is None):
            raise ValueError("PretrainedWeights: give exactly one of checkpoint and pretrain_config")
        self.checkpoint = checkpoint
        self.pretrain_config = pretrain_config
        self.prefixes = tuple(prefixes)
        self.cache_dir = cache_dir

    def resolve_checkpoint(self, trainer: L.Trainer) -> Path:
        if self.checkpoint is not None:
            return Path(self.checkpoint)
        return fitted_checkpoint(trainer, self.pretrain_config, self.cache_dir)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        path = self.resolve_checkpoint(trainer)
        if not path.is_file():
            raise FileNotFoundError(f"PretrainedWeights: no checkpoint at {path}")
        try:
            copy_pretrained_weights(pl_module, load_state_dict_file(path), self.prefixes)
        except ValueError as error:
            raise ValueError(f"PretrainedWeights({path}): {error}") from None
