"""The shared harness every technique must pass, driven by the registry.

Each built technique's harness case lives in its card (``harness:`` in
``callbacks/<family>/<id>.card.yaml``: constructor arguments, a partner technique to stack it
with, and generic set-up such as ``remember: model``); :func:`reglab.registry.example_technique`
builds it.
The few cases that need set-up the card cannot express name a factory here (``harness.factory``).
``tests/test_harness.py`` runs every case through accumulation, crash-and-resume equivalence,
bf16, stacking and (for techniques that keep state) one 2-process DDP group.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.strategies import DDPStrategy
from lightning.fabric.strategies.launchers.multiprocessing import _disable_module_memory_sharing
from lightning.pytorch.strategies.launchers.multiprocessing import _GlobalStateSnapshot, _MultiProcessingLauncher

from reglab import registry
from reglab.technique import Technique

#: how the suite starts the ranks of its 2-process DDP tests. Not "spawn": each spawned child re-imports torch and
#: Lightning (most of a DDP test's 15-30 s). Not "fork": an xdist worker has threads of its own, and a child forked
#: while one of them held a lock hangs (seen once in a full run). The forkserver is a clean single-threaded process,
#: started once per worker with torch and Lightning preloaded (conftest), and each rank is a fork of it. What a
#: rank would inherit from the server rather than from the test is put back as a spawned child has it
#: (:func:`_as_if_spawned`); reglab itself is not preloaded, so no reglab state is older than the test.
START_METHOD = "forkserver"


def _parent_state() -> dict[str, object]:
    """What :func:`_as_if_spawned` gives a rank: this process's environment and working folder."""
    return {"environment": dict(os.environ), "cwd": os.getcwd()}


def _as_if_spawned(state: dict[str, object]) -> None:
    """Make a forkserver child what a spawned child of the test would be: the test's environment (Lightning
    reseeds a rank from PL_GLOBAL_SEED: a stale one from the server's start got that wrong) and working folder,
    Python's and NumPy's generators seeded afresh from the OS and torch's at its start seed, not the server's
    states shared by every child."""
    import random

    import numpy as np

    os.environ.clear()
    os.environ.update(state["environment"])
    os.chdir(state["cwd"])
    random.seed()
    np.random.seed()
    torch.manual_seed(torch.initial_seed())


def _in_parent_state(rank: int, state: dict[str, object], function: Callable, args: tuple) -> None:
    _as_if_spawned(state)
    function(rank, *args)


def start_ranks(function: Callable, *args: object) -> None:
    """``function(rank, *args)`` in 2 processes started by :data:`START_METHOD`, each in this process's
    environment and folder (the test sets the rank variables itself, e.g. :func:`ddp_worker`)."""
    torch.multiprocessing.start_processes(_in_parent_state, args=(_parent_state(), function, args), nprocs=2,
                                          start_method=START_METHOD)


class EnvironmentPassingLauncher(_MultiProcessingLauncher):
    """Lightning's launcher for ``start_method`` spawn / fork / forkserver, each rank in the test's state
    (:func:`_as_if_spawned`). Lightning treats a forkserver child as a fork of the test, but it is not one: its
    module arrives pickled, in memory shared with the other rank (whose optimizer steps would then write into
    the same weights), and without the test's random states. So a forkserver rank is set up as Lightning sets up
    a spawned one: the module copied out of shared memory, the test's global states (random generators,
    deterministic flags) restored."""

    def launch(self, function: Callable, *args: object, trainer: object = None, **kwargs: object) -> object:
        # pickled with this launcher into each rank
        self.parent_state = {**_parent_state(), "global_states": _GlobalStateSnapshot.capture()}
        return super().launch(function, *args, trainer=trainer, **kwargs)

    def _wrapping_function(self, process_idx: int, trainer: object, function: Callable, args: object,
                           kwargs: object, return_queue: object, global_states: object = None) -> None:
        _as_if_spawned(self.parent_state)
        if self._start_method == "forkserver":
            args, kwargs = _disable_module_memory_sharing((args, kwargs))
        super()._wrapping_function(process_idx, trainer, function, args, kwargs, return_queue,
                                   self.parent_state["global_states"])


class ForkserverDDP(DDPStrategy):
    def _configure_launcher(self) -> None:
        self._launcher = EnvironmentPassingLauncher(self, start_method=START_METHOD)


def ddp_strategy() -> DDPStrategy:
    """A 2-process DDP strategy for ``L.Trainer(devices=2, ...)`` whose ranks start by :data:`START_METHOD`."""
    return ForkserverDDP(start_method=START_METHOD)

small_module = registry.example_module
noisy_digits = registry.example_data
quiet_trainer = registry.example_trainer
distillation_teacher = registry.example_checkpoint


def consolidated_si() -> Technique:
    """SI as after a finished task: anchored to small_module(seed=1), with the importance of a
    made-up path (a random path integral over a move of 0.1 per parameter), so that its state is
    not all zeros."""
    si, previous = registry.card("si").load()(**registry.card("si").harness["init_args"]), small_module(seed=1)
    generator = torch.Generator().manual_seed(2)
    si.task_start = {name: p.detach() - 0.1 for name, p in previous.named_parameters()}
    si.omega = {name: torch.rand(p.shape, generator=generator) for name, p in previous.named_parameters()}
    return si.remember(previous)


def ist_with_scores() -> Technique:
    """IST with a made-up score for its one unit: the harness MLP has a single adapted layer, and
    one unit's score never moves (the rewards of identical suppressed sets cancel), so that its
    state is not all zeros; tests/test_ist.py checks the score updates on models with several units."""
    ist = registry.card("ist").load()(**registry.card("ist").harness["init_args"])
    ist.importance, ist.update_counts = torch.tensor([0.5]), torch.zeros(1, dtype=torch.long)
    return ist


def mamba_fscil_session() -> Technique:
    """Mamba-FSCIL as after a base session of classes 0-5 of the harness digits: its memory holds
    one made-up mean feature per base class (the harness MLP's 32-d features), so a plain fit is an
    incremental session on all ten classes (the new branch trains under every loss term)."""
    card = registry.card("mamba_fscil")
    technique = card.load()(**card.harness["init_args"])
    technique.base_classes = list(range(6))
    technique.memory_features = torch.rand(6, 32, generator=torch.Generator().manual_seed(3))
    technique.memory_labels = torch.arange(6)
    return technique


def ogen_with_coop() -> Technique:
    """OGEN owning CoOp's prompt learner (it trains CoOp's context, which alone it cannot make)."""
    from reglab.callbacks.baselines import PromptTuning

    return registry.card("ogen").load()(**registry.card("ogen").harness["init_args"], prompt_learner=PromptTuning())


def glad_with_lora() -> Technique:
    """GLAD owning LoRA (its gradient regularizes LoRA's adapters, which alone it cannot add)."""
    from reglab.callbacks.peft import LoRA

    return registry.card("glad").load()(**registry.card("glad").harness["init_args"], lora=LoRA(r=2, lora_alpha=2))


def cpe_clip_session() -> Technique:
    """CPE-CLIP as after a base session of classes 0-5: a plain fit on the ten captioned digits is then an
    incremental session whose prompt updates are scaled by 4 / 10."""
    card = registry.card("cpe_clip")
    technique = card.load()(**card.harness["init_args"])
    technique.seen_classes = list(range(6))
    return technique


def happy_stage() -> Technique:
    """Happy as at the start of an unlabelled stage (task 1): the fit initializes the new heads,
    takes the labelled classes' prototypes and trains under all its terms."""
    technique = registry.example_technique("happy")
    technique.task = 1
    return technique


FACTORIES: dict[str, Callable[[], Technique]] = {"consolidated_si": consolidated_si, "ist_with_scores": ist_with_scores,
                                                 "cpe_clip_session": cpe_clip_session, "happy_stage": happy_stage,
                                                 "mamba_fscil_session": mamba_fscil_session, "ogen_with_coop": ogen_with_coop,
                                                 "glad_with_lora": glad_with_lora}


def make(technique_id: str) -> Technique:
    """The technique of this id as its harness case builds it."""
    factory = registry.card(technique_id).harness.get("factory")
    return FACTORIES[factory]() if factory else registry.example_technique(technique_id)


def data_for(technique_id: str, batch_size: int = 256) -> L.LightningDataModule:
    """The harness data of this technique's case (``harness.data``: domains for techniques that need them)."""
    return noisy_digits(batch_size, registry.card(technique_id).harness.get("data"))


def module_for(technique_id: str, seed: int = 0) -> L.LightningModule:
    """The harness model for this technique: :func:`small_module` with its case's ``backbone_kwargs``
    (a technique that adapts batch-norm layers runs on the MLP with ``norm: batch``) and ``data`` (a
    two-tower technique runs on the two-tower model)."""
    spec = registry.card(technique_id).harness
    return small_module(seed, backbone_kwargs=spec.get("backbone_kwargs"), data=spec.get("data"))


def partner(technique_id: str) -> Technique:
    """The technique the harness stacks with this one (its card's ``harness.partner``)."""
    return make(registry.card(technique_id).harness["partner"])


def flat_state(technique: Technique) -> dict[str, torch.Tensor]:
    """The technique's state_dict as name -> tensor (non-tensors dropped)."""
    return {k: v for k, v in technique.state_dict().items() if isinstance(v, torch.Tensor)}


class RankStateCheck(L.Callback):
    """At the end of a DDP fit, compares the technique's state across ranks and writes a report."""

    def __init__(self, technique: Technique, report_dir: Path) -> None:
        self.technique, self.report_dir = technique, report_dir

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        report = {}
        for key, value in flat_state(self.technique).items():
            gathered = pl_module.all_gather(value.to(pl_module.device))
            report[key] = {
                "same_on_all_ranks": bool(all(torch.equal(gathered[0], g) for g in gathered)),
                "nonzero": bool(value.ne(0).any()),
            }
        self.report_dir.mkdir(parents=True, exist_ok=True)
        (self.report_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(report))


def ddp_worker(rank: int, technique_ids: list[str], port: int, report_dir: str) -> None:
    """One of two processes of one DDP group (started by the test, not by Lightning: LOCAL_RANK
    tells Lightning the processes exist): a 4-step DDP fit per technique, all in this group, each
    writing its RankStateCheck report under ``report_dir/<id>``."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", NODE_RANK="0",
                      LOCAL_RANK=str(rank), RANK=str(rank))
    for technique_id in technique_ids:
        technique = make(technique_id)
        trainer = quiet_trainer(
            max_steps=4, devices=2, strategy="ddp",
            callbacks=[technique, RankStateCheck(technique, Path(report_dir) / technique_id)],
        )
        trainer.fit(module_for(technique_id), datamodule=data_for(technique_id, batch_size=128))


def assert_resumes_exactly_and_trains_in_bf16(make_module: Callable[[], L.LightningModule],
                                              make_data: Callable[[], L.LightningDataModule], tmp_path: Path,
                                              total_steps: int = 5, stop_at: int = 3) -> None:
    """A task module fitted ``total_steps`` straight and one stopped at ``stop_at`` (mid-epoch for data of 5
    batches an epoch) and resumed from its checkpoint end with equal weights; two steps in bf16-mixed
    give a finite loss. ``make_module`` must build the same initial weights every call."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    def run(max_steps, ckpt_path=None, checkpoint=None, **trainer):
        module = make_module()
        extra = dict(enable_checkpointing=True, callbacks=[checkpoint]) if checkpoint else {}
        fit = quiet_trainer(max_steps=max_steps, limit_val_batches=0, **extra, **trainer)
        fit.fit(module, datamodule=make_data(), ckpt_path=ckpt_path)
        return module, fit

    straight, _ = run(total_steps)
    run(stop_at, checkpoint=ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=stop_at, save_top_k=-1))
    resumed, _ = run(total_steps, ckpt_path=str(tmp_path / f"epoch=0-step={stop_at}.ckpt"))
    for key, value in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value, rtol=0, atol=0, msg=key)
    _, bf16 = run(2, precision="bf16-mixed")
    assert torch.isfinite(bf16.callback_metrics["train/loss"])
