"""CPE-CLIP (paper 39): the session-dependent update scale, the prompts in both towers, a session's training
(only the prompts move, only the session's classes are live, the regularized step is lambda times the plain
one) and the restore hook. The shared harness (tests/test_harness.py) runs it as an incremental session."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from torch import nn

from reglab.callbacks.continual import CPECLIP
from reglab.callbacks.continual.cpe_clip import SessionPrompts, attach_prompts, image_convolutions, update_scale
from reglab.continual.clip_claims import session_accuracies
from reglab.datamodules import CaptionedDigitsDataModule, TaskSequenceDataModule
from reglab.tasks import CLIPModule
from reglab.technique import TechniqueConfigError
from test_clip import TINY_HF_CLIP

QUIET = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
             enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)


def tiny_clip(seed: int = 0) -> CLIPModule:
    L.seed_everything(seed, verbose=False)
    return CLIPModule("tiny", num_classes=10, input_shape=(3, 8, 8), objective="classification", lr=1e-2,
                      model_kwargs={"embed_dim": 16, "text_config": {"num_hidden_layers": 2}})


@pytest.fixture(scope="module")
def sessions() -> TaskSequenceDataModule:
    data = TaskSequenceDataModule(CaptionedDigitsDataModule(domains=["upright"], batch_size=16, seed=0), num_tasks=3,
                                  first_task_classes=6, shots=5)
    data.setup("fit")
    return data


def test_update_scale_is_the_new_classes_over_all_seen():
    assert update_scale([0, 1, 2, 3], []) == 1.0  # the base session: no regularization
    assert update_scale([6, 7], range(6)) == 2 / 8
    assert update_scale([8, 9], range(8)) == 2 / 10
    assert update_scale([4, 5, 6], [0, 1, 2, 3, 4]) == 2 / 7  # a class seen before is not new


def test_a_session_accuracy_weights_each_seen_task_by_its_test_images():
    # after session 1: 0.9 on 300 base images and 0.3 on 100 new ones -> 300 * 0.9 + 100 * 0.3 = 300 of 400
    assert session_accuracies([[0.8], [0.9, 0.3]], [300, 100, 50]) == pytest.approx([0.8, 0.75])


@pytest.mark.parametrize("scale", [0.25, 1.0])
def test_scaled_updates_follow_the_official_scaled_gradients_under_sgd_with_momentum(scale):
    """The official regularizer multiplies the gradients by lambda before SGD (momentum 0.9); CPECLIP scales each
    update by lambda, through step hooks on the optimizer: the same trajectory."""
    target = torch.tensor([1.0, -2.0, 0.5])

    def trajectory(scaled_updates: bool) -> torch.Tensor:
        holder = nn.Module()
        holder.cpe_clip = nn.Module()
        holder.cpe_clip.p = nn.Parameter(torch.zeros(3))
        optimizer = torch.optim.SGD(holder.parameters(), lr=0.1, momentum=0.9)
        technique = CPECLIP()
        technique.scale = scale
        if scaled_updates:
            technique.on_train_start(SimpleNamespace(optimizers=[optimizer]), holder)
        for _ in range(5):
            optimizer.zero_grad()
            ((holder.cpe_clip.p - target) ** 2).sum().backward()
            if not scaled_updates:
                holder.cpe_clip.p.grad *= scale
            optimizer.step()
        return holder.cpe_clip.p.detach()

    torch.testing.assert_close(trajectory(True), trajectory(False))
    assert not torch.equal(trajectory(True), torch.zeros(3))


def test_prompts_enter_every_text_layer_and_shift_the_convolutions():
    module = tiny_clip()
    bare = copy.deepcopy(module).eval()
    convolutions = image_convolutions(module.clip)
    prompts = attach_prompts(module, {"depth": 3, "length": 2, "text_width": 384, "placeholder": 1060,
                                      "image_widths": [c.in_channels for c in convolutions]})
    module.eval()
    seen: dict[str, torch.Tensor] = {}
    module.clip.text_encoder.encoder.layer[1].register_forward_pre_hook(
        lambda m, args: seen.__setitem__("layer1", args[0]))
    convolutions[0].register_forward_pre_hook(lambda m, args: seen.__setitem__("conv0", args[0]))
    tokens = {"input_ids": torch.tensor([[101, 1060, 1060, 2698, 1012, 102], [101, 1037, 2698, 1012, 102, 0]]),
              "attention_mask": torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]])}
    with torch.no_grad():
        prompted = module.clip.encode_text(tokens)
        plain = bare.clip.encode_text(tokens)
        # layer 1's input carries g[1] at the prompt positions of the prompt row only
        torch.testing.assert_close(seen["layer1"][0, 1:3], prompts.prompts[1])
        assert not torch.allclose(seen["layer1"][1, 1:3], prompts.prompts[1])
        torch.testing.assert_close(prompted[1], plain[1])  # a caption without placeholders is unchanged
        assert not torch.allclose(prompted[0], plain[0])
        images = torch.rand(2, 3, 8, 8)
        module.clip.encode_image(images)
        shift = prompts.projections[0](prompts.prompts[0]).mean(0)
        torch.testing.assert_close(seen["conv0"], images + shift[None, :, None, None])
        for projection in prompts.projections:  # zero projections: the pretrained image tower exactly
            nn.init.zeros_(projection.weight), nn.init.zeros_(projection.bias)
        torch.testing.assert_close(module.clip.encode_image(images), bare.clip.encode_image(images))


def test_a_session_trains_only_the_prompts_on_its_classes_and_the_regularized_step_is_lambda_times_the_plain(
        sessions, tmp_path):
    sessions.set_task(1)
    start = tiny_clip()
    L.Trainer(**QUIET, max_epochs=1, limit_train_batches=0, callbacks=[CPECLIP()]).fit(start, datamodule=sessions)
    moves, live = {}, {}
    for regularization in ("balance", None):
        module, technique = copy.deepcopy(start), CPECLIP(regularization=regularization)
        technique.seen_classes = list(sessions.tasks[0])
        before = {name: p.detach().clone() for name, p in module.named_parameters()}
        trainer = L.Trainer(**QUIET, max_epochs=1, limit_train_batches=1, callbacks=[technique])
        trainer.fit(module, datamodule=sessions)
        changed = {name for name, p in module.named_parameters() if not torch.equal(p, before[name])}
        assert changed and all(name.startswith("cpe_clip.") for name in changed)
        moves[regularization] = {name: module.state_dict()[name] - before[name] for name in changed}
        live[regularization] = module.active_classes.nonzero().flatten().tolist()
        assert technique.scale == (2 / 8 if regularization else 1.0)
    assert live["balance"] == sorted(sessions.tasks[1])
    for name, move in moves[None].items():  # one AdamW step from the same state: the move scales exactly
        torch.testing.assert_close(moves["balance"][name], move * 2 / 8)
    # a fresh module loaded from a checkpoint gets the prompts (restore hook) and classifies as the trained one
    trainer.save_checkpoint(tmp_path / "session.ckpt")
    loaded = CLIPModule.load_from_checkpoint(tmp_path / "session.ckpt", map_location="cpu").eval()
    assert isinstance(loaded.cpe_clip, SessionPrompts)
    loaded.set_class_prompts(module.class_prompts)
    images = torch.rand(4, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), module.eval()(images))


def test_bad_settings_are_refused_early(sessions):
    with pytest.raises(TechniqueConfigError, match="regularization"):
        CPECLIP(regularization="freeze")
    with pytest.raises(TechniqueConfigError, match="prompt_length"):
        CPECLIP(prompt_length=0)
    real_clip = CLIPModule("hf", num_classes=10, input_shape=(3, 8, 8), model_kwargs=TINY_HF_CLIP)
    with pytest.raises(TechniqueConfigError, match="convolutional image tower"):  # a ViT: the official tokens
        CPECLIP().setup(SimpleNamespace(datamodule=sessions), real_clip, "test")
    module = tiny_clip()
    module.hparams.objective = "contrastive"
    with pytest.raises(TechniqueConfigError, match="objective='classification'"):
        L.Trainer(**QUIET, max_epochs=1, callbacks=[CPECLIP()]).fit(module, datamodule=sessions)
