"""The shared harness every technique must pass, and its registry.

Add an entry to HARNESS for every technique exported by ``callbacks``: how to build it for a
small digits run, and a partner technique to stack it with. ``tests/test_harness.py`` runs each
entry through accumulation, crash-and-resume equivalence, bf16, stacking and (for techniques
that keep state) 2-process DDP.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import lightning as L
import torch

from callbacks import ELR, GCE, LabelSmoothing
from datamodules import DigitsDataModule, LabelNoise
from lightning_app.tasks import ClassificationModule
from lightning_app.technique import Technique


@dataclass(frozen=True)
class HarnessCase:
    make: Callable[[], Technique]
    partner: Callable[[], Technique]


HARNESS: dict[str, HarnessCase] = {
    "ELR": HarnessCase(make=lambda: ELR(beta=0.7, lam=3.0), partner=lambda: LabelSmoothing(0.1)),
    "GCE": HarnessCase(make=lambda: GCE(q=0.7), partner=lambda: ELR()),
    "LabelSmoothing": HarnessCase(make=lambda: LabelSmoothing(0.1), partner=lambda: ELR()),
}


def noisy_digits(batch_size: int = 256) -> DigitsDataModule:
    """Flat digits with 40% symmetric noise: ~5 training steps per epoch at batch 256."""
    return DigitsDataModule(flatten=True, batch_size=batch_size, label_noise=LabelNoise(rate=0.4))


def small_module(seed: int = 0) -> ClassificationModule:
    L.seed_everything(seed, verbose=False)
    return ClassificationModule("mlp", num_classes=10, input_shape=(64,), backbone_kwargs={"hidden_sizes": (32,)}, lr=1e-2)


def quiet_trainer(**kwargs) -> L.Trainer:
    defaults = dict(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )
    return L.Trainer(**{**defaults, **kwargs})


def flat_state(technique: Technique) -> dict[str, torch.Tensor]:
    """The technique's state_dict as name -> tensor (non-tensors dropped)."""
    return {k: v for k, v in technique.state_dict().items() if isinstance(v, torch.Tensor)}
