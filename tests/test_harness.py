"""Every built technique of the registry through the shared harness (see tests/harness.py)."""

from __future__ import annotations

import json
import math
import pickle
import socket

import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from harness import (FACTORIES, data_for, ddp_worker, flat_state, make, module_for, partner, quiet_trainer,
                     start_ranks)
from reglab import registry
from reglab.technique import EvalTimeAdaptation

TECHNIQUES = [card.id for card in registry.techniques()]
STATEFUL = [card.id for card in registry.techniques() if card.load().stateful]
EVAL_TIME = [card.id for card in registry.techniques() if issubclass(card.load(), EvalTimeAdaptation)]


def test_every_harness_case_builds_its_technique():
    for technique_id in TECHNIQUES:
        assert type(make(technique_id)) is registry.card(technique_id).load(), technique_id
    named = {registry.card(t).harness.get("factory") for t in TECHNIQUES} - {None}
    assert named == set(FACTORIES), f"factories named by cards {sorted(named)} vs defined {sorted(FACTORIES)}"


def test_every_technique_pickles_as_ddp_spawn_sends_it():
    # the suite's DDP tests fork their ranks; under ddp_spawn Lightning pickles the trainer's callbacks to each child
    for technique_id in TECHNIQUES:
        technique = make(technique_id)
        assert type(pickle.loads(pickle.dumps(technique))) is type(technique), technique_id


def _weights(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


class StartWeights(Callback):
    """The module's weights when training starts: after every setup, so with the parameters a technique
    adds there (adapters, CoOp's context), which may be the only ones that train."""

    def on_train_start(self, trainer, pl_module):
        self.weights = _weights(pl_module)


def _check_trained(trainer, module, before: StartWeights, technique):
    loss = trainer.callback_metrics["train/loss"]
    assert math.isfinite(float(loss))
    assert any(not torch.equal(before.weights[k], v) for k, v in module.state_dict().items() if k in before.weights), \
        "no weight changed"
    if "loss_terms" in technique.stages:
        assert any(key.startswith(f"train/{technique.name}/") for key in trainer.callback_metrics)


@pytest.mark.parametrize("name", TECHNIQUES)
def test_fit_with_gradient_accumulation(name):
    technique, module = make(name), module_for(name)
    before = StartWeights()
    trainer = quiet_trainer(max_steps=3, accumulate_grad_batches=2, callbacks=[technique, before])
    trainer.fit(module, datamodule=data_for(name))
    assert trainer.global_step == 3
    _check_trained(trainer, module, before, technique)


@pytest.mark.parametrize("name", TECHNIQUES)
def test_resume_is_exact(name, tmp_path):
    """Stop in the middle of the second epoch, resume: same weights and state as no stop."""
    total_steps, stop_at = 12, 7  # 5 steps per epoch: crosses an epoch end, stops mid-epoch

    def run(max_steps, ckpt_path=None, checkpoint=None):
        technique, module = make(name), module_for(name)
        extra = dict(enable_checkpointing=True, callbacks=[technique, checkpoint]) if checkpoint else dict(callbacks=[technique])
        trainer = quiet_trainer(max_steps=max_steps, **extra)
        trainer.fit(module, datamodule=data_for(name), ckpt_path=ckpt_path)
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
    technique, module = make(name), module_for(name)
    before = StartWeights()
    trainer = quiet_trainer(max_steps=3, precision="bf16-mixed", callbacks=[technique, before])
    trainer.fit(module, datamodule=data_for(name))
    _check_trained(trainer, module, before, technique)


@pytest.mark.parametrize("name", TECHNIQUES)
def test_stacks_with_partner(name):
    technique, other, module = make(name), partner(name), module_for(name)
    assert type(other) is not type(technique)
    before = StartWeights()
    trainer = quiet_trainer(max_steps=3, callbacks=[technique, other, before])
    trainer.fit(module, datamodule=data_for(name))
    _check_trained(trainer, module, before, technique)
    _check_trained(trainer, module, before, other)


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
@pytest.mark.parametrize("name", EVAL_TIME)
def test_adapts_at_test_time_and_restores_the_model(name, precision):
    """An eval-time technique adapts in test, predict and validate runs of a default Trainer
    (inference mode on), every run starts from the source model (two runs agree exactly), and the model leaves each
    run as it entered it, unless keep_adapted (then only the adapted parameters differ)."""
    technique, module, data = make(name), module_for(name), data_for(name)
    quiet_trainer(max_steps=3, callbacks=[technique]).fit(module, datamodule=data)
    before = _weights(module)
    (source,) = quiet_trainer(precision=precision).test(module, datamodule=data, verbose=False)
    runs = [quiet_trainer(precision=precision, callbacks=[technique]).test(module, datamodule=data, verbose=False)[0]
            for _ in range(2)]
    assert math.isfinite(runs[0][f"test/{name}/adaptation_loss"])
    assert runs[0]["test/loss"] != source["test/loss"], "the test run did not adapt"
    assert runs[0] == runs[1], "the second run did not start from the source model"
    quiet_trainer(precision=precision, callbacks=[technique]).predict(module, datamodule=data)
    (validated,) = quiet_trainer(precision=precision, callbacks=[technique]).validate(module, datamodule=data, verbose=False)
    assert math.isfinite(validated[f"val/{name}/adaptation_loss"])
    for key, value in module.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0, msg=key)
    technique.keep_adapted = True
    quiet_trainer(precision=precision, callbacks=[technique]).test(module, datamodule=data, verbose=False)
    changed = {key for key, value in module.state_dict().items() if not torch.equal(value, before[key])}
    adapted = {key for key, _ in technique.adapted_parameters(module)}
    assert changed and changed <= adapted, (changed, adapted)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_ddp_two_processes_keep_identical_state(tmp_path):
    """One 2-process DDP group fits every stateful technique in turn: each tensor of its state
    must be identical on both ranks and have been updated."""
    start_ranks(ddp_worker, STATEFUL, _free_port(), str(tmp_path))
    assert len(STATEFUL) > 5
    for name in STATEFUL:
        reports = [json.loads((tmp_path / name / f"rank{r}.json").read_text()) for r in range(2)]
        assert reports[0], f"{name} has no tensor state to compare"
        for report in reports:
            for key, checks in report.items():
                assert checks["same_on_all_ranks"], f"{name}.{key} differs across ranks"
                assert checks["nonzero"], f"{name}.{key} was never updated"
