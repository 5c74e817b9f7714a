"""Checkpoints and state dicts: what several families need from a checkpoint, in the core.

* :func:`run_restore_hooks` — a checkpoint may name the functions that make a bare module ready
  to load it (a parameter-efficient fine-tuning checkpoint holds only the trained weights, and
  its hook redoes the surgery first). The family that writes such a checkpoint registers its hook
  *in the checkpoint* with :func:`add_restore_hook`, so the core (``RegularizedMixin``) runs it
  without knowing any family, also in a fresh process that never imported the family.
* :func:`first_mismatch`, :func:`load_state_dict_file`, :func:`copy_pretrained_weights` — comparing
  and copying state dicts (model soups, pretrained starts, distillation teachers).
* :func:`fitted_checkpoint` — the checkpoint a ``reglab fit`` of a config produces, fitted once in
  a subprocess and cached by the config's content (pretrained backbones, distillation teachers).
"""

from __future__ import annotations

import hashlib
import importlib
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

StateDict = Mapping[str, Tensor]
RESTORE_HOOKS_KEY = "reglab_restore_hooks"


def add_restore_hook(checkpoint: dict[str, Any], hook: str) -> None:
    """Record ``"package.module:function"`` in ``checkpoint``; it is called as
    ``function(module, checkpoint)`` before the checkpoint's weights are loaded into ``module``."""
    module_name, _, function = hook.partition(":")
    if not module_name.startswith("reglab.") or not function:
        raise ValueError(f"a restore hook is 'reglab.<module>:<function>', got {hook!r}")
    hooks = checkpoint.setdefault(RESTORE_HOOKS_KEY, [])
    if hook not in hooks:
        hooks.append(hook)


def run_restore_hooks(module: nn.Module, checkpoint: dict[str, Any]) -> None:
    """Call every restore hook ``checkpoint`` names, in the order they were added."""
    for hook in checkpoint.get(RESTORE_HOOKS_KEY, ()):
        module_name, _, function = hook.partition(":")
        if not module_name.startswith("reglab."):
            raise ValueError(f"the checkpoint names a restore hook outside reglab: {hook!r}")
        getattr(importlib.import_module(module_name), function)(module, checkpoint)


def first_mismatch(expected: StateDict, found: StateDict, names: tuple[str, str] = ("first", "second")) -> str | None:
    """A sentence naming the first entry in which two state dicts differ in presence, shape or dtype."""
    for key in list(expected) + [k for k in found if k not in expected]:
        if key not in found:
            return f"`{key}` is in {names[0]} but not in {names[1]}"
        if key not in expected:
            return f"`{key}` is in {names[1]} but not in {names[0]}"
        a, b = expected[key], found[key]
        if a.shape != b.shape:
            return f"`{key}` has shape {tuple(a.shape)} in {names[0]} but {tuple(b.shape)} in {names[1]}"
        if a.dtype != b.dtype:
            return f"`{key}` has dtype {a.dtype} in {names[0]} but {b.dtype} in {names[1]}"
    return None


def load_state_dict_file(path: str | Path) -> dict[str, Tensor]:
    """The ``state_dict`` of a Lightning checkpoint, or the file itself if it is a plain state dict."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    return checkpoint.get("state_dict", checkpoint)


def copy_pretrained_weights(module: nn.Module, pretrained: StateDict, prefixes: Sequence[str]) -> list[str]:
    """Copy the entries of ``pretrained`` under ``prefixes`` into ``module``; returns their names.

    Every module entry under a prefix must be in ``pretrained`` with the same shape and dtype,
    and vice versa; otherwise a ``ValueError`` names the first entry that differs.
    """

    def under_prefixes(state: StateDict) -> dict[str, Tensor]:
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


#: extra ``reglab fit`` arguments for every cached pretraining fit, e.g. a smoke budget
#: (``--trainer.max_epochs=1 --trainer.limit_train_batches=2``) to try a config's whole chain in seconds;
#: they are part of the cache key, so a shortened fit never stands in for the full one
PRETRAIN_ARGS_ENV = "REGLAB_PRETRAIN_ARGS"


def pretrained_checkpoint_for(config: str | Path, cache_dir: str | Path) -> Path:
    """The checkpoint a fit of ``config`` produces: cached by the config's content (and the arguments
    in ``$REGLAB_PRETRAIN_ARGS``), fitted on a miss."""
    config = Path(config)
    extra = shlex.split(os.environ.get(PRETRAIN_ARGS_ENV, ""))
    digest = hashlib.sha256(config.read_bytes() + "\0".join(extra).encode()).hexdigest()[:12]
    cached = Path(cache_dir) / f"{config.stem}-{digest}.ckpt"
    if cached.is_file():
        return cached
    cached.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="reglab-pretrain-") as runs_dir:
        command = [sys.executable, "-m", "reglab", "fit", "--config", str(config), f"--runs_dir={runs_dir}",
                   "--run_name=pretrain", "--trainer.enable_progress_bar=false", "--trainer.logger=false", *extra]
        print(f"pretraining once with {config}{' ' + ' '.join(extra) if extra else ''} -> {cached}", flush=True)
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        produced = Path(runs_dir) / "pretrain" / "version_0" / "checkpoints" / "last.ckpt"
        # a name of this process's own: two processes that missed the same entry at once (two test
        # workers, two users' runs) never write one file together; the later rename wins, same weights
        partial = cached.with_name(f"{cached.name}.{os.getpid()}.partial")
        shutil.copyfile(produced, partial)
        partial.replace(cached)  # atomic: a crash never leaves a truncated cache entry
    return cached


def pretrained_checkpoint_of(config: Mapping[str, Any], name: str, cache_dir: str | Path) -> Path:
    """:func:`pretrained_checkpoint_for` of a config built in code (a protocol's per-seed pretraining): it is
    written once as ``<cache_dir>/configs/<content hash>/<name>.yaml`` (a folder named by its content, so an
    existing file already holds this text) and fitted once."""
    import yaml

    text = yaml.safe_dump(dict(config), sort_keys=True)
    derived = Path(cache_dir) / "configs" / hashlib.sha256(text.encode()).hexdigest()[:12] / f"{name}.yaml"
    if not derived.is_file():
        derived.parent.mkdir(parents=True, exist_ok=True)
        derived.write_text(text)
    return pretrained_checkpoint_for(derived, cache_dir)


def fitted_checkpoint(trainer: L.Trainer, config: str | Path, cache_dir: str | Path) -> Path:
    """:func:`pretrained_checkpoint_for` inside a run: rank 0 fits, the other ranks wait for it."""
    if trainer.is_global_zero:
        pretrained_checkpoint_for(config, cache_dir)
    trainer.strategy.barrier("reglab-pretrain")
    return pretrained_checkpoint_for(config, cache_dir)
