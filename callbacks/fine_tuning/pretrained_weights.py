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

import hashlib
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import lightning as L
import torch
from torch import Tensor

from reglab.soups import first_mismatch


def load_state_dict_file(path: str | Path) -> dict[str, Tensor]:
    """The ``state_dict`` of a Lightning checkpoint, or the file itself if it is a plain state dict."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    return checkpoint.get("state_dict", checkpoint)


def copy_pretrained_weights(
    module: torch.nn.Module, pretrained: Mapping[str, Tensor], prefixes: Sequence[str]
) -> list[str]:
    """Copy the entries of ``pretrained`` under ``prefixes`` into ``module``; returns their names.

    Every module entry under a prefix must be in ``pretrained`` with the same shape and dtype,
    and vice versa; otherwise a ``ValueError`` names the first entry that differs.
    """

    def under_prefixes(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {k: v for k, v in state.items() if any(k == p or k.startswith(p + ".") for p in prefixes)}

    wanted, own = under_prefixes(pretrained), under_prefixes(module.state_dict())
    if not wanted:
        raise ValueError(f"the pretrained weights have no entries under {list(prefixes)}; its keys start with "
                         f"{sorted({k.split('.')[0] for k in pretrained})}")
    mismatch = first_mismatch(own, wanted, names=("the module", "the pretrained checkpoint"))
    if mismatch:
        raise ValueError(
            f"cannot start from the pretrained weights: {mismatch}. Pretrain the same architecture, "
            "and load the pretrained weights before anything that changes the architecture"
        )
    module.load_state_dict(wanted, strict=False)
    return sorted(wanted)


def pretrained_checkpoint_for(config: str | Path, cache_dir: str | Path) -> Path:
    """The checkpoint a fit of ``config`` produces: cached by the config's content, fitted on a miss."""
    config = Path(config)
    digest = hashlib.sha256(config.read_bytes()).hexdigest()[:12]
    cached = Path(cache_dir) / f"{config.stem}-{digest}.ckpt"
    if cached.is_file():
        return cached
    cached.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="reglab-pretrain-") as runs_dir:
        command = [sys.executable, "-m", "reglab", "fit", "--config", str(config), f"--runs_dir={runs_dir}",
                   "--run_name=pretrain", "--trainer.enable_progress_bar=false", "--trainer.logger=false"]
        print(f"pretraining once with {config} -> {cached}", flush=True)
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        produced = Path(runs_dir) / "pretrain" / "version_0" / "checkpoints" / "last.ckpt"
        partial = cached.with_suffix(".partial")
        shutil.copyfile(produced, partial)
        partial.replace(cached)  # atomic: a crash never leaves a truncated cache entry
    return cached


class PretrainedWeights(L.Callback):
    """Copy pretrained weights into the module when a fit starts (see the module docstring).

    Args:
        checkpoint: a Lightning checkpoint or state-dict file to start from.
        pretrain_config: instead of ``checkpoint``, a ``reglab fit`` config whose result to start
            from (fitted once, then cached).
        prefixes: the parts of the state dict to copy, e.g. ``["backbone"]`` (new head) or
            ``["backbone", "head"]`` (the whole classifier).
        cache_dir: where checkpoints of ``pretrain_config`` are cached.
    """

    def __init__(
        self,
        checkpoint: str | None = None,
        pretrain_config: str | None = None,
        prefixes: Sequence[str] = ("backbone",),
        cache_dir: str = "runs/pretrained",
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
        if trainer.is_global_zero:
            pretrained_checkpoint_for(self.pretrain_config, self.cache_dir)
        trainer.strategy.barrier("reglab-pretrain")  # other ranks wait for rank 0's pretraining
        return pretrained_checkpoint_for(self.pretrain_config, self.cache_dir)

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
