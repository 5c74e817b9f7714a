"""The shared harness every technique must pass, and its registry.

Add an entry to HARNESS for every technique exported by ``callbacks``: how to build it for a
small digits run, and a partner technique to stack it with. ``tests/test_harness.py`` runs each
entry through accumulation, crash-and-resume equivalence, bf16, stacking and (for techniques
that keep state) 2-process DDP.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

import lightning as L
import torch

from reglab.callbacks import ELR, EWC, GCE, FeatureDistillation, L2ToPreviousTask, LabelSmoothing, LwF
from reglab.callbacks import SI, ExperienceReplay
from reglab.callbacks import OVOR, TEEN
from reglab.callbacks import MVP
from reglab.callbacks import PSKD, CutMix, KnowledgeDistillation, Mixup
from reglab.callbacks import BitFit, FullFineTuning, GSLoRA, LinearProbe, LoLDU, LoRA, LoRASB, SoMA, SVFit
from reglab.callbacks import BALoRA, PEGO, RegularizedMaskTuning
from reglab.callbacks import EMA, SWA, MeanTeacher, OGENSelfDistillation
from reglab.datamodules import DigitsDataModule, LabelNoise
from reglab.tasks import ClassificationModule
from reglab.technique import Technique


@dataclass(frozen=True)
class HarnessCase:
    make: Callable[[], Technique]
    partner: Callable[[], Technique]


HARNESS: dict[str, HarnessCase] = {
    "ELR": HarnessCase(make=lambda: ELR(beta=0.7, lam=3.0), partner=lambda: LabelSmoothing(0.1)),
    "GCE": HarnessCase(make=lambda: GCE(q=0.7), partner=lambda: ELR()),
    "LabelSmoothing": HarnessCase(make=lambda: LabelSmoothing(0.1), partner=lambda: ELR()),
    # PS-KD first: a later mixing technique then mixes its per-sample targets too. The harness
    # bounds runs by max_steps only, so PS-KD's schedule length T is given (12 steps = 3 epochs).
    "PSKD": HarnessCase(make=lambda: PSKD(alpha_T=0.8, total_epochs=3), partner=lambda: Mixup()),
    "Mixup": HarnessCase(make=lambda: Mixup(alpha=1.0), partner=lambda: LabelSmoothing(0.1)),
    # Every batch cut-mixed (the default mixes half), on the 8x8 images the flat inputs come from.
    "CutMix": HarnessCase(
        make=lambda: CutMix(alpha=1.0, probability=1.0, image_shape=(1, 8, 8)),
        partner=lambda: KnowledgeDistillation(distillation_teacher()),
    ),
    "KnowledgeDistillation": HarnessCase(
        make=lambda: KnowledgeDistillation(distillation_teacher(), temperature=4.0),
        partner=lambda: PSKD(total_epochs=3),
    ),
    # Continual techniques are no-ops until a task ends, so each starts as after a finished task:
    # anchored to / distilling from another model (seed 1), EWC with a Fisher from one batch.
    "L2ToPreviousTask": HarnessCase(
        make=lambda: L2ToPreviousTask(lam=1.0).remember(small_module(seed=1)), partner=lambda: LwF()
    ),
    "EWC": HarnessCase(
        make=lambda: EWC(lam=100.0).remember(
            small_module(seed=1), [{"input": torch.rand(16, 64), "target": torch.randint(0, 10, (16,))}]
        ),
        partner=lambda: LabelSmoothing(0.1),
    ),
    "LwF": HarnessCase(make=lambda: LwF().remember(small_module(seed=1)), partner=lambda: L2ToPreviousTask()),
    "FeatureDistillation": HarnessCase(
        make=lambda: FeatureDistillation(lam=1.0).remember(small_module(seed=1)), partner=lambda: ELR()
    ),
    "SI": HarnessCase(make=lambda: consolidated_si(), partner=lambda: LwF().remember(small_module(seed=1))),
    # Replay fills its buffer from the first step (a small one, so it fills and replaces within a run).
    "ExperienceReplay": HarnessCase(make=lambda: ExperienceReplay(buffer_size=64, replay_batch_size=32), partner=lambda: ELR()),
    # MVP on an ordinary shuffled batch stream; label smoothing exercises its soft-target path.
    "MVP": HarnessCase(make=lambda: MVP(), partner=lambda: LabelSmoothing(0.1)),
    # OVOR regularizes from the first epoch of a plain fit, with a smaller outlier synthesis (the
    # defaults would draw 30,000 candidates per epoch). TEEN acts only at task boundaries; in a
    # plain fit it must leave training untouched.
    "OVOR": HarnessCase(
        make=lambda: OVOR(k=10, boundary_points=10, candidates_per_point=50, outliers_per_class=4),
        partner=lambda: LabelSmoothing(0.1),
    ),
    "TEEN": HarnessCase(make=lambda: TEEN(), partner=lambda: ELR()),
    # Parameter-efficient fine-tuning: surgery on the MLP's hidden Linear layers (the head trains).
    "FullFineTuning": HarnessCase(make=lambda: FullFineTuning(), partner=lambda: ELR()),
    "LinearProbe": HarnessCase(make=lambda: LinearProbe(), partner=lambda: ELR()),
    "BitFit": HarnessCase(make=lambda: BitFit(), partner=lambda: ELR()),
    "LoRA": HarnessCase(make=lambda: LoRA(r=4), partner=lambda: ELR()),
    "SVFit": HarnessCase(make=lambda: SVFit(rank=8), partner=lambda: ELR()),
    "LoLDU": HarnessCase(make=lambda: LoLDU(), partner=lambda: ELR()),
    "LoRASB": HarnessCase(make=lambda: LoRASB(rank=4, gradient_samples=64), partner=lambda: ELR()),
    # SoMA's single MLP block is adapted (a third of one block rounds to none frozen); its weight
    # decay schedule is given its length, as the harness's runs stop at different max_steps.
    "SoMA": HarnessCase(make=lambda: SoMA(r=4, total_steps=12), partner=lambda: ELR()),
    "GSLoRA": HarnessCase(make=lambda: GSLoRA(forget_classes=[0, 1], r=4), partner=lambda: ELR()),
    "RegularizedMaskTuning": HarnessCase(make=lambda: RegularizedMaskTuning(), partner=lambda: ELR()),
    "PEGO": HarnessCase(make=lambda: PEGO(num_adapters=2, r=2), partner=lambda: ELR()),
    "BALoRA": HarnessCase(make=lambda: BALoRA(r=4), partner=lambda: ELR()),
    # Weight averaging: SWA from the first step (a run of a few steps never reaches an epoch-based
    # start); the mean teacher stacked with an EMA that is evaluated while the teacher trains.
    "EMA": HarnessCase(make=lambda: EMA(decay=0.9), partner=lambda: LabelSmoothing(0.1)),
    "SWA": HarnessCase(make=lambda: SWA(start_epoch=0, every_n_steps=1), partner=lambda: ELR()),
    "MeanTeacher": HarnessCase(make=lambda: MeanTeacher(lam=1.0, temperature=2.0), partner=lambda: EMA()),
    "OGENSelfDistillation": HarnessCase(
        make=lambda: OGENSelfDistillation(min_window=1, max_window=2, total_epochs=3), partner=lambda: LabelSmoothing(0.1)
    ),
}


def noisy_digits(batch_size: int = 256) -> DigitsDataModule:
    """Flat digits with 40% symmetric noise: ~5 training steps per epoch at batch 256."""
    return DigitsDataModule(flatten=True, batch_size=batch_size, label_noise=LabelNoise(rate=0.4))


def small_module(seed: int = 0) -> ClassificationModule:
    L.seed_everything(seed, verbose=False)
    return ClassificationModule("mlp", num_classes=10, input_shape=(64,), backbone_kwargs={"hidden_sizes": (32,)}, lr=1e-2)


def consolidated_si() -> SI:
    """SI as after a finished task: anchored to small_module(seed=1), with the importance of a
    made-up path (a random path integral over a move of 0.1 per parameter)."""
    si, previous = SI(c=1.0), small_module(seed=1)
    generator = torch.Generator().manual_seed(2)
    si.task_start = {name: p.detach() - 0.1 for name, p in previous.named_parameters()}
    si.omega = {name: torch.rand(p.shape, generator=generator) for name, p in previous.named_parameters()}
    return si.remember(previous)


@functools.cache
def distillation_teacher() -> str:
    """Path of an untrained small_module(seed=1) saved as a Lightning checkpoint, written once per
    process (the teacher's quality does not matter to the harness, only that it loads)."""
    directory = tempfile.mkdtemp(prefix="reglab-harness-teacher-")
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    teacher = small_module(seed=1)
    path = f"{directory}/teacher.ckpt"
    torch.save({"state_dict": teacher.state_dict(), "hyper_parameters": dict(teacher.hparams),
                "pytorch-lightning_version": L.__version__}, path)
    return path


def quiet_trainer(**kwargs) -> L.Trainer:
    defaults = dict(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )
    return L.Trainer(**{**defaults, **kwargs})


def flat_state(technique: Technique) -> dict[str, torch.Tensor]:
    """The technique's state_dict as name -> tensor (non-tensors dropped)."""
    return {k: v for k, v in technique.state_dict().items() if isinstance(v, torch.Tensor)}
