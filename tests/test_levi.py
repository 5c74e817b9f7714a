"""LEVI (a task module) and PretrainedWeights: what trains, what stays frozen, stacking, exact resume."""

from __future__ import annotations

import doctest
import subprocess

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

import reglab.checkpoints as checkpoints
import reglab.tasks.levi
from reglab.callbacks import ELR
from reglab.callbacks.fine_tuning import PretrainedWeights
from reglab.checkpoints import copy_pretrained_weights
from reglab.datamodules import RotatedDigitsDataModule
from reglab.tasks import ClassificationModule
from reglab.tasks.levi import LEVIModule

QUIET = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
             enable_model_summary=False, num_sanity_val_steps=0)


def rotated_digits() -> RotatedDigitsDataModule:
    """Flat rotated digits, batch 256: 5 training steps per epoch."""
    return RotatedDigitsDataModule(flatten=True, batch_size=256, train_angles=[0, 30], test_angles=[60])


def levi(seed: int = 0, **kwargs) -> LEVIModule:
    L.seed_everything(seed, verbose=False)
    arguments = dict(backbone_kwargs={"hidden_sizes": (32, 32)}, layers=["layers.2", "layers.4"], task_model="mlp",
                     task_model_kwargs={"hidden_sizes": (16,)}, adapter_hidden=32, lr=1e-2)
    return LEVIModule("mlp", num_classes=10, input_shape=(64,), **{**arguments, **kwargs})


def weights(module: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items() if k.startswith(prefix)}


def test_only_the_task_model_and_adapting_layers_train():
    module = levi()
    trainable = {name.split(".")[0] for name, p in module.named_parameters() if p.requires_grad}
    assert trainable == {"task_model", "head"}
    assert module.view_dims == [32, 32, 16] and module.head[0].in_features == 80
    features, logits = module.features_and_logits(torch.zeros(3, 64))
    assert features.shape == (3, 80) and logits.shape == (3, 10)
    assert levi(layers=None).view_dims == [32, 16]  # default: the backbone's output only


def test_unknown_layer_names_the_accepted_ones():
    with pytest.raises(ValueError, match=r"no submodule 'layers\.9'.*'layers\.0'"):
        levi(layers=["layers.9"])


def test_convolutional_views_are_pooled_and_the_frozen_batchnorm_keeps_its_statistics():
    L.seed_everything(0, verbose=False)
    module = LEVIModule("cnn", num_classes=10, input_shape=(1, 8, 8), layers=["blocks.2", "blocks.8"],
                        task_model="cnn", task_model_kwargs={"channels": [4]}, lr=1e-2)
    assert module.view_dims == [32, 64, 4]
    frozen = weights(module, "backbone.")
    trainer = L.Trainer(max_steps=3, **QUIET)
    trainer.fit(module, datamodule=RotatedDigitsDataModule(batch_size=256))
    for key, value in module.state_dict().items():
        if key.startswith("backbone."):
            assert torch.equal(value, frozen[key]), f"{key} changed"  # running stats included
    module.train()
    assert not module.backbone.training and module.task_model.training


def test_fit_trains_the_ensemble_and_stacks_with_a_loss_technique():
    module = levi()
    before = weights(module, "")
    trainer = L.Trainer(max_steps=4, callbacks=[ELR(beta=0.7, lam=3.0)], **QUIET)
    trainer.fit(module, datamodule=rotated_digits())
    after = module.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items() if k.startswith("backbone."))
    assert not torch.equal(after["task_model.layers.1.weight"], before["task_model.layers.1.weight"])
    assert not torch.equal(after["head.2.weight"], before["head.2.weight"])
    assert "train/elr/regularizer" in trainer.callback_metrics


def test_bf16_mixed():
    trainer = L.Trainer(max_steps=2, precision="bf16-mixed", **QUIET)
    trainer.fit(levi(), datamodule=rotated_digits())
    assert torch.isfinite(trainer.callback_metrics["train/loss"])


def test_resume_in_the_middle_of_an_epoch_is_exact_and_checkpoints_reload(tmp_path):
    total_steps, stop_at = 8, 7  # 5 steps per epoch: stops in the second epoch

    def run(max_steps, ckpt_path=None, checkpoint=None):
        module = levi()
        extra = dict(enable_checkpointing=True, callbacks=[checkpoint]) if checkpoint else {}
        trainer = L.Trainer(max_steps=max_steps, **{**QUIET, **extra})
        trainer.fit(module, datamodule=rotated_digits(), ckpt_path=ckpt_path)
        return module

    straight = run(total_steps)
    run(stop_at, checkpoint=ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=stop_at, save_top_k=-1))
    ckpt = tmp_path / f"epoch=1-step={stop_at}.ckpt"
    resumed = run(total_steps, ckpt_path=str(ckpt))
    for key, value in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value, rtol=0, atol=0, msg=key)

    reloaded = LEVIModule.load_from_checkpoint(ckpt)
    assert reloaded.hparams.layers == ["layers.2", "layers.4"]
    x = torch.randn(4, 64)
    stopped = torch.load(ckpt, weights_only=True)["state_dict"]
    assert all(torch.equal(reloaded.state_dict()[k], v) for k, v in stopped.items())
    assert reloaded.eval()(x).shape == (4, 10)


def test_pretrained_weights_fill_the_backbone_and_mismatches_are_named(tmp_path):
    L.seed_everything(1, verbose=False)
    source = ClassificationModule("mlp", num_classes=10, input_shape=(64,), backbone_kwargs={"hidden_sizes": (32, 32)})
    torch.save({"state_dict": source.state_dict()}, tmp_path / "pretrained.ckpt")
    module = levi()
    trainer = L.Trainer(max_steps=2, callbacks=[PretrainedWeights(str(tmp_path / "pretrained.ckpt"))], **QUIET)
    trainer.fit(module, datamodule=rotated_digits())
    for key, value in source.state_dict().items():
        if key.startswith("backbone."):
            assert torch.equal(module.state_dict()[key], value), key  # loaded, then frozen

    narrow = ClassificationModule("mlp", num_classes=10, input_shape=(64,), backbone_kwargs={"hidden_sizes": (8, 32)})
    with pytest.raises(ValueError, match=r"`backbone.layers.1.weight` has shape \(8, 64\) in the module but \(32, 64\)"):
        copy_pretrained_weights(narrow, source.state_dict(), ["backbone"])
    with pytest.raises(ValueError, match="no entries under"):
        copy_pretrained_weights(narrow, source.state_dict(), ["encoder"])
    with pytest.raises(ValueError, match="exactly one of"):
        PretrainedWeights()


def test_a_pretraining_config_is_fitted_once_and_cached_by_its_content(tmp_path, monkeypatch):
    fits = []

    def fake_fit(command, check, stdout):
        runs_dir = next(a.split("=", 1)[1] for a in command if a.startswith("--runs_dir="))
        produced = tmp_path.joinpath(runs_dir, "pretrain", "version_0", "checkpoints", "last.ckpt")
        produced.parent.mkdir(parents=True)
        torch.save({"state_dict": {"w": torch.tensor(float(len(fits)))}}, produced)
        fits.append(command)

    monkeypatch.setattr(subprocess, "run", fake_fit)
    config = tmp_path / "pretrain.yaml"
    config.write_text("seed_everything: 0\n")
    first = checkpoints.pretrained_checkpoint_for(config, tmp_path / "cache")
    again = checkpoints.pretrained_checkpoint_for(config, tmp_path / "cache")
    assert first == again and len(fits) == 1 and "--config" in fits[0]
    config.write_text("seed_everything: 1\n")
    changed = checkpoints.pretrained_checkpoint_for(config, tmp_path / "cache")
    assert changed != first and len(fits) == 2 and not list((tmp_path / "cache").glob("*.partial"))
    # extra pretraining arguments reach the fit and key the cache: a smoke-budget fit is its own entry
    monkeypatch.setenv(checkpoints.PRETRAIN_ARGS_ENV, "--trainer.max_epochs=1 --trainer.limit_train_batches=2")
    short = checkpoints.pretrained_checkpoint_for(config, tmp_path / "cache")
    assert short != changed and len(fits) == 3 and fits[-1][-2:] == ["--trainer.max_epochs=1", "--trainer.limit_train_batches=2"]
    assert checkpoints.pretrained_checkpoint_for(config, tmp_path / "cache") == short and len(fits) == 3


def test_docstring_examples_run():
    assert doctest.testmod(reglab.tasks.levi, verbose=False).failed == 0
