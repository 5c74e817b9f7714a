"""Sharded and compiled models (issue 10, item 7).

Every technique either runs on a module with a ``torch.compile``d part (whose parameter names
gain ``_orig_mod.``) or is refused at setup; under FSDP the techniques that declare
``fsdp_unsupported`` are refused at setup with their reason. Lightning's FSDP strategy and
torch's FSDP need a GPU (neither runs on CPU in this torch/Lightning), so the FSDP runs that
must work are in benchmarks/gpu_checks.sh; here the refusal path runs through a real Trainer.
Lightning's ``ModelParallelStrategy`` (torch's ``fully_shard``, DTensor parameters) does run on
CPU with gloo: two processes train sharded with a loss-only technique and with LoRA.
The compiled runs use the ``eager`` backend: the same ``_orig_mod.`` names, no C compiler.
"""

from __future__ import annotations

from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from torch.distributed.fsdp import fully_shard

from harness import (START_METHOD, EnvironmentPassingLauncher, data_for, make, module_for, noisy_digits, quiet_trainer,
                     small_module)
from reglab import registry
from reglab.callbacks import ELR, EMA, LoRA
from reglab.tasks import ClassificationModule
from reglab.technique import TechniqueConfigError, check_sharding

TECHNIQUES = [card.id for card in registry.techniques()]
REFUSED_UNDER_FSDP = [name for name in TECHNIQUES if make(name).fsdp_unsupported]


def compiled_module(technique_id: str | None = None):
    module = small_module(seed=0) if technique_id is None else module_for(technique_id)
    # the module's networks: a classifier's backbone, a two-tower model's towers
    names = ["backbone"] if hasattr(module, "backbone") else [
        name for name, child in module.named_children() if any(True for _ in child.parameters())]
    for name in names:
        setattr(module, name, torch.compile(getattr(module, name), backend="eager"))
    return module


class FSDPOnCPU(FSDPStrategy):
    """Lightning's FSDP strategy without its GPU-only guard, which checks the exact type: far
    enough for the techniques' setup checks, which run before FSDP wraps the module."""


def test_the_averaging_family_and_parameter_anchors_declare_why_they_refuse_fsdp():
    assert {"ema", "swa", "mean_teacher", "ogen_self_distillation", "ewc", "si", "l2_previous"} <= set(REFUSED_UNDER_FSDP)
    assert {"elr", "gce", "label_smoothing", "mixup", "cutmix", "ps_kd", "lora"}.isdisjoint(REFUSED_UNDER_FSDP)


@pytest.mark.parametrize("name", REFUSED_UNDER_FSDP)
def test_a_technique_that_cannot_run_sharded_is_refused_naming_its_reason(name):
    technique = make(name)
    with pytest.raises(TechniqueConfigError, match=rf"{type(technique).__name__}: it cannot run under FSDPStrategy: "
                                                   rf".*Fix: train with strategy='ddp'"):
        check_sharding(technique, SimpleNamespace(strategy=FSDPStrategy()))


def test_fsdp_refusal_comes_at_setup_of_a_real_fit():
    trainer = quiet_trainer(max_steps=1, strategy=FSDPOnCPU(process_group_backend="gloo"), callbacks=[EMA()])
    try:
        with pytest.raises(TechniqueConfigError, match="EMA: it cannot run under FSDPOnCPU: it swaps the averaged"):
            trainer.fit(small_module(), datamodule=noisy_digits())
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


class TrainableAtStart(Callback):
    """The trainable parameters' values when training starts, after every technique's setup."""

    def on_train_start(self, trainer, pl_module) -> None:
        self.values = {n: p.detach().clone() for n, p in pl_module.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("name", TECHNIQUES)
def test_every_technique_trains_a_compiled_module(name):
    module = compiled_module(name)
    assert any("._orig_mod." in n for n, _ in module.named_parameters())
    # taken once the technique's setup has run: surgery renames what it wraps, prompt tuning adds its context
    start = TrainableAtStart()
    quiet_trainer(max_steps=3, limit_val_batches=1, callbacks=[make(name), start]).fit(
        module, datamodule=data_for(name, batch_size=64))
    after = dict(module.named_parameters())
    assert any(not torch.equal(start.values[n], after[n]) for n in start.values if n in after), "nothing trained"
    assert all(torch.isfinite(p).all() for p in after.values())


def test_ema_of_a_compiled_module_averages_its_real_parameters():
    module, ema = compiled_module(), EMA(decay=0.5)
    quiet_trainer(max_steps=3, limit_val_batches=1, callbacks=[ema]).fit(module, datamodule=noisy_digits(batch_size=64))
    parameters = dict(module.named_parameters())
    assert set(parameters) <= set(ema.average.names), "parameters the average skipped"
    # after fit the module holds the average (like its checkpoints), name by name
    for name, value in zip(ema.average.names, ema.average.tensors):
        if name in parameters:
            torch.testing.assert_close(parameters[name].detach(), value)


class MetricsOnlyLauncher(EnvironmentPassingLauncher):
    """Starts the ranks by the suite's START_METHOD (pytest cannot be re-run as a script) and brings back the
    metrics only: DTensor weights do not reload in the main process."""

    def _collect_rank_zero_results(self, trainer, results):
        output = super()._collect_rank_zero_results(trainer, results)
        return None if output is None else output._replace(weights_path=None)


class ModelParallelOnCPUProcesses(ModelParallelStrategy):
    def _configure_launcher(self) -> None:
        self._launcher = MetricsOnlyLauncher(self, start_method=START_METHOD)


class ShardedClassifier(ClassificationModule):
    """Backbone and head each a ``fully_shard`` unit: the step contract calls them directly, not
    through the module's forward, which would unshard a root unit."""

    def configure_model(self) -> None:
        mesh = self.device_mesh["data_parallel"]
        fully_shard(self.backbone, mesh=mesh)
        fully_shard(self.head, mesh=mesh)
        fully_shard(self, mesh=mesh)


@pytest.mark.parametrize(("make", "term"), [(lambda: ELR(lam=3.0), "train/loss"), (lambda: LoRA(r=4), "train/loss")],
                         ids=["ELR", "LoRA"])
def test_techniques_that_declare_nothing_train_a_sharded_model(make, term):
    L.seed_everything(0, verbose=False)
    module = ShardedClassifier("mlp", num_classes=10, input_shape=(64,), backbone_kwargs={"hidden_sizes": (32,)}, lr=1e-2)
    trainer = quiet_trainer(max_steps=3, devices=2, strategy=ModelParallelOnCPUProcesses(), limit_val_batches=1,
                            callbacks=[make()])
    trainer.fit(module, datamodule=noisy_digits(batch_size=64))
    assert trainer.state.finished and torch.isfinite(trainer.callback_metrics[term])
