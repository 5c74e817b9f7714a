"""The diffusion task module: the forward process and clean estimate by hand, the step contract's output,
condition dropout, seeded sampling (DDIM / DDPM, classifier-free guidance), predict, text conditioning on
MiniLM's states, exact resume and bf16 of the registry's harness case, the set-up errors and the `reglab sample`
command."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from diffusers import DDPMScheduler
from harness import assert_resumes_exactly_and_trains_in_bf16

from reglab import registry
from reglab.datamodules import DigitsDataModule
from reglab.generative.sample import main as sample_main
from reglab.tasks import DiffusionModule
from reglab.tasks.diffusion import noise_prediction_loss, predicted_clean, training_pair
from reglab.technique import TechniqueConfigError

TINY = dict(input_shape=(1, 8, 8), num_classes=10, block_out_channels=(8, 16), norm_num_groups=4,
            attention_head_dim=4, attention=False, sample_steps=2)


def test_the_forward_process_and_the_clean_estimate_by_hand():
    # two training steps, betas 0.1 and 0.5: cumulative alphas 0.9 and 0.45
    scheduler = DDPMScheduler(num_train_timesteps=2, trained_betas=[0.1, 0.5])
    clean, noise, t = torch.tensor([[1.0], [2.0]]), torch.tensor([[0.5], [-1.0]]), torch.tensor([0, 1])
    noisy, target = training_pair(scheduler, clean, noise, t)
    hand = torch.tensor([[0.9 ** 0.5 * 1.0 + 0.1 ** 0.5 * 0.5], [0.45 ** 0.5 * 2.0 - 0.55 ** 0.5]])
    torch.testing.assert_close(noisy, hand)
    torch.testing.assert_close(target, noise)
    # with the true noise the estimate is the clean sample again
    torch.testing.assert_close(predicted_clean(scheduler, noisy, target, t), clean)
    velocity = DDPMScheduler(num_train_timesteps=2, trained_betas=[0.1, 0.5], prediction_type="v_prediction")
    noisy_v, v = training_pair(velocity, clean, noise, t)
    torch.testing.assert_close(v, torch.tensor([[0.9 ** 0.5 * 0.5 - 0.1 ** 0.5 * 1.0],
                                                [0.45 ** 0.5 * -1.0 - 0.55 ** 0.5 * 2.0]]))
    torch.testing.assert_close(predicted_clean(velocity, noisy_v, v, t), clean)


def test_the_loss_is_the_per_sample_mean_squared_error():
    prediction = torch.tensor([[[[1.0, 2.0]]], [[[0.0, 0.0]]]])
    target = torch.tensor([[[[0.0, 0.0]]], [[[3.0, -1.0]]]])
    torch.testing.assert_close(noise_prediction_loss(prediction, target), torch.tensor([2.5, 5.0]))


def test_the_step_output_and_condition_dropout(one_thread):
    torch.manual_seed(0)
    module = DiffusionModule(**TINY, cond_dropout=0.5)
    batch = {"input": torch.rand(64, 1, 8, 8), "target": torch.arange(64) % 10, "index": torch.arange(64)}
    out = module.forward_step(batch)
    assert out.logits.shape == out.target.shape == (64, 1, 8, 8) and out.labels is None
    condition = out.extras["condition"]
    dropped = condition == 10
    assert 10 < int(dropped.sum()) < 54     # about half, from the seeded global RNG
    assert torch.equal(condition[~dropped], batch["target"][~dropped])
    assert out.extras["clean"].min() >= -1 and out.extras["clean"].max() <= 1
    kept = DiffusionModule(**TINY, cond_dropout=0.0).forward_step(batch).extras["condition"]
    assert torch.equal(kept, batch["target"])
    # evaluation draws the noise from the batch's seed: the same loss twice
    module.eval()
    first, second = (module.task_loss(module.forward_step(batch)) for _ in range(2))
    torch.testing.assert_close(first, second)


def test_sampling_is_seeded_and_guidance_changes_it(one_thread):
    torch.manual_seed(0)
    module = DiffusionModule(**TINY)
    labels = torch.tensor([1, 7])
    a, b = module.sample(labels, seed=3), module.sample(labels, seed=3)
    assert torch.equal(a, b) and a.min() >= 0 and a.max() <= 1
    assert not torch.equal(a, module.sample(labels, seed=4))
    assert not torch.equal(a, module.sample(labels, seed=3, guidance_scale=3.0))
    assert not torch.equal(a, module.sample(torch.tensor([2, 7]), seed=3))
    ancestral = module.sample(labels, seed=3, sampler="ddpm", steps=3)
    assert ancestral.shape == (2, 1, 8, 8) and module.training


def test_predict_samples_the_batch_classes(one_thread, tmp_path):
    data = DigitsDataModule(batch_size=4, eval_batch_size=4)
    module = DiffusionModule(**TINY)
    trainer = L.Trainer(max_steps=2, limit_val_batches=1, limit_predict_batches=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path)
    trainer.fit(module, data)
    predictions = trainer.predict(module, data)
    assert [p.shape for p in predictions] == [(4, 1, 8, 8)] * 2
    assert not torch.equal(predictions[0], predictions[1])    # seeded by each batch's first index
    data.setup("predict")
    first = next(iter(data.predict_dataloader()))
    torch.testing.assert_close(predictions[0], module.sample(first["target"], seed=int(first["index"][0])))


def test_text_conditioning_reads_minilm_states_of_the_class_names(one_thread):
    module = DiffusionModule(**{**TINY, "attention": True}, conditioning="text")
    assert type(module.unet).__name__ == "UNet2DConditionModel"
    assert module.prompt_states.shape[:2] == module.prompt_mask.shape and len(module.prompt_states) == 11
    assert module.prompt_states.shape[-1] == 384
    assert not torch.allclose(module.prompt_states[1], module.prompt_states[7])
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([5, 500])
    outputs = [module.denoise(x, t, torch.tensor([c, c])) for c in (1, 7)]
    assert not torch.allclose(*outputs)
    assert "prompt_states" not in module.state_dict()


def test_set_up_errors_name_the_fix():
    with pytest.raises(TechniqueConfigError, match="cannot be halved"):
        DiffusionModule(**{**TINY, "input_shape": (1, 7, 7)})
    with pytest.raises(TechniqueConfigError, match="one name per class"):
        DiffusionModule(**TINY, conditioning="text", class_names=["a", "b"])
    with pytest.raises(TechniqueConfigError, match="needs num_classes"):
        DiffusionModule(**{**TINY, "num_classes": None})
    with pytest.raises(TechniqueConfigError, match="sampler"):
        DiffusionModule(**TINY, sampler="euler")


def test_the_sample_command_writes_a_grid_and_keeps_existing_folders(one_thread, tmp_path, capsys):
    module = DiffusionModule(**TINY)
    trainer = L.Trainer(max_steps=1, limit_val_batches=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, DigitsDataModule(batch_size=8))
    ckpt = tmp_path / "model.ckpt"
    trainer.save_checkpoint(ckpt)
    out = tmp_path / "samples"
    sample_main(["--ckpt", str(ckpt), "--out", str(out), "--per-class", "2", "--steps", "2", "--seed", "1"])
    saved = torch.load(out / "samples.pt", weights_only=True)
    assert (out / "grid.png").stat().st_size > 0
    assert saved["samples"].shape == (20, 1, 8, 8) and saved["labels"].tolist() == [c for c in range(10) for _ in (0, 1)]
    before = (out / "grid.png").read_bytes()
    with pytest.raises(SystemExit):
        sample_main(["--ckpt", str(ckpt), "--out", str(out)])
    assert "is kept" in capsys.readouterr().err and (out / "grid.png").read_bytes() == before


def test_the_harness_case_resumes_exactly_and_trains_in_bf16(one_thread, tmp_path):
    """Timesteps, noise and condition dropout come from the global RNG, which the mixin checkpoints:
    stopped mid-epoch and resumed, the weights equal an uninterrupted run's."""
    # batches of 256: 5 steps per epoch, so the stop at step 3 is mid-epoch
    assert_resumes_exactly_and_trains_in_bf16(lambda: registry.example_module(data="diffusion"),
                                              lambda: registry.example_data(data="diffusion"), tmp_path)
