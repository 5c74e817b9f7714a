"""Every technique exported by ``callbacks`` through the shared harness (see tests/harness.py)."""

from __future__ import annotations

import json
import math

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

import reglab.callbacks
from harness import HARNESS, flat_state, noisy_digits, quiet_trainer, small_module

TECHNIQUES = sorted(reglab.callbacks.__all__)
STATEFUL = [name for name in TECHNIQUES if getattr(reglab.callbacks, name).stateful]


def test_every_exported_technique_has_a_harness_entry():
    missing = set(TECHNIQUES) - set(HARNESS)
    assert not missing, f"techniques without a harness entry in tests/harness.py: {sorted(missing)}"
    assert not set(HARNESS) - set(TECHNIQUES), "harness entries for techniques callbacks does not export"


def _weights(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _check_trained(trainer, module, before, technique):
    loss = trainer.callback_metrics["train/loss"]
    assert math.isfinite(float(loss))
    # keys the technique added (adapters injected at setup) have no "before"
    assert any(k in before and not torch.equal(before[k], v) for k, v in module.state_dict().items()), "no weight changed"
    if "loss_terms" in technique.stages:
        assert any(key.startswith(f"train/{technique.name}/") for key in trainer.callback_metrics)


@pytest.mark.parametrize("name", TECHNIQUES)
def test_fit_with_gradient_accumulation(name):
    technique, module = HARNESS[name].make(), small_module()
    before = _weights(module)
    trainer = quiet_trainer(max_steps=3, accumulate_grad_batches=2, callbacks=[technique])
    trainer.fit(module, datamodule=noisy_digits())
    assert trainer.global_step == 3
    _check_trained(trainer, module, before, technique)


@pytest.mark.parametrize("name", TECHNIQUES)
def test_resume_is_exact(name, tmp_path):
    """Stop in the middle of the second epoch, resume: same weights and state as no stop."""
    total_steps, stop_at = 12, 7  # 5 steps per epoch: crosses an epoch end, stops mid-epoch

    def run(max_steps, ckpt_path=None, checkpoint=None):
        technique, module = HARNESS[name].make(), small_module()
        extra = dict(enable_checkpointing=True, callbacks=[technique, checkpoint]) if checkpoint else dict(callbacks=[technique])
        trainer = quiet_trainer(max_steps=max_steps, **extra)
        trainer.fit(module, datamodule=noisy_digits(), ckpt_path=ckpt_path)
        return module, technique

    straight_module, straight_technique = run(total_steps)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=stop_at, save_top_k=-1)
    run(stop_at, checkpoint=checkpoint)
    ckpt = tmp_path / f"epoch=1-step={stop_at}.ckpt"
    assert ckpt.is_file(), sorted(p.name for p in tmp_path.iterdir())
    resumed_module, resumed_technique = run(total_steps, ckpt_path=str(ckpt))

    for key, value in straight_module.state_dict().items():
        torch.testing.assert_close(resumed_module.state_dict()[key], value, rtol=0, atol=0, msg=key)
    straight_state, resumed_state = flat_state(straight_technique), flat_state(resumed_technique)
    assert straight_state.keys() == resumed_state.keys()
    for key, value in straight_state.items():
        torch.testing.assert_close(resumed_state[key], value, rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("name", TECHNIQUES)
def test_bf16_mixed(name):
    technique, module = HARNESS[name].make(), small_module()
    before = _weights(module)
    trainer = quiet_trainer(max_steps=3, precision="bf16-mixed", callbacks=[technique])
    trainer.fit(module, datamodule=noisy_digits())
    _check_trained(trainer, module, before, technique)


@pytest.mark.parametrize("name", TECHNIQUES)
def test_stacks_with_partner(name):
    technique, partner, module = HARNESS[name].make(), HARNESS[name].partner(), small_module()
    assert type(partner) is not type(technique)
    before = _weights(module)
    trainer = quiet_trainer(max_steps=3, callbacks=[technique, partner])
    trainer.fit(module, datamodule=noisy_digits())
    _check_trained(trainer, module, before, technique)
    _check_trained(trainer, module, before, partner)


class RankStateCheck(L.Callback):
    """At the end of a DDP fit, compares the technique's state across ranks and writes a report."""

    def __init__(self, technique, report_dir):
        self.technique, self.report_dir = technique, report_dir

    def on_train_end(self, trainer, pl_module):
        report = {}
        for key, value in flat_state(self.technique).items():
            gathered = pl_module.all_gather(value.to(pl_module.device))
            report[key] = {
                "same_on_all_ranks": bool(all(torch.equal(gathered[0], g) for g in gathered)),
                "nonzero": bool(value.abs().sum() > 0),
            }
        (self.report_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(report))


@pytest.mark.slow
@pytest.mark.parametrize("name", STATEFUL)
def test_ddp_two_processes_keep_identical_state(name, tmp_path):
    technique = HARNESS[name].make()
    trainer = quiet_trainer(
        max_steps=4, devices=2, strategy="ddp_spawn", callbacks=[technique, RankStateCheck(technique, tmp_path)]
    )
    trainer.fit(small_module(), datamodule=noisy_digits(batch_size=128))
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert reports[0], f"{name} has no tensor state to compare"
    for report in reports:
        for key, checks in report.items():
            assert checks["same_on_all_ranks"], f"{name}.{key} differs across ranks"
            assert checks["nonzero"], f"{name}.{key} was never updated"
