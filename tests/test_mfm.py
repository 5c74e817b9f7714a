"""MFM's and pixel masking's maths against hand-computed cases, and their pretraining in the finetune protocol."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from reglab import registry
from reglab.bench.protocols import ClaimError
from reglab.callbacks.self_supervised.mfm import MFM, disc, frequency_corrupt, frequency_loss, frequency_masks
from reglab.callbacks.self_supervised.pixel_mask import PixelMask, patch_masks
from reglab.checkpoints import load_state_dict_file
from reglab.peft_claims import FinetuneProtocol
from reglab.technique import TechniqueConfigError


def test_low_pass_keeps_the_disc_around_the_centred_spectrum_and_high_pass_the_rest():
    # 4x4, centre (2, 2), radius 1.5: every offset with dy² + dx² <= 2 is inside (2.25 is the bound)
    inside = torch.tensor([[0, 0, 0, 0], [0, 1, 1, 1], [0, 1, 1, 1], [0, 1, 1, 1]], dtype=torch.float)
    torch.testing.assert_close(disc(4, 4, 1.5), inside)
    masks = frequency_masks(torch.tensor([True, False]), 4, 4, 1.5)
    assert masks.shape == (2, 1, 4, 4)
    torch.testing.assert_close(masks[0, 0], inside)
    torch.testing.assert_close(masks[1, 0], 1 - inside)


def test_removing_frequencies_by_hand_keep_only_the_mean_or_remove_it():
    image = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])  # mean 0.25
    only_mean = frequency_masks(torch.tensor([True]), 2, 2, 0.5)  # the disc is the DC term alone
    torch.testing.assert_close(frequency_corrupt(image, only_mean, None), torch.full_like(image, 0.25))
    without_mean = 1 - only_mean
    torch.testing.assert_close(frequency_corrupt(image, without_mean, None),
                               torch.tensor([[[[0.75, -0.25], [-0.25, -0.25]]]]))
    # the official clamp to the pixel range [0, 1]
    torch.testing.assert_close(frequency_corrupt(image, without_mean, (0.0, 1.0)), torch.tensor([[[[0.75, 0.0], [0.0, 0.0]]]]))


def test_frequency_loss_counts_only_the_removed_frequencies_normalised_by_the_batch():
    target = torch.rand(2, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    c, d = 0.3, 0.2
    # sample 0 is off by a constant c: orthonormal 2x2 FFT puts 2c on the DC term alone, which its high-pass mask
    # removed; sample 1 by a checkerboard of amplitude d: 2d on the highest frequency, which its low-pass mask removed
    offsets = torch.stack([torch.full((1, 2, 2), c), d * torch.tensor([[[1.0, -1.0], [-1.0, 1.0]]])])
    masks = frequency_masks(torch.tensor([False, True]), 2, 2, 0.5)  # 1 and 3 removed: 2 per sample on average
    loss = frequency_loss(target + offsets, target, masks)
    torch.testing.assert_close(loss, torch.tensor([2 * c / 2, 2 * d / 2]), atol=1e-5, rtol=0)
    # the official scalar: the sum over every removed entry over their count (4) and the channels (1)
    torch.testing.assert_close(loss.mean(), torch.tensor((2 * c + 2 * d) / 4), atol=1e-5, rtol=0)
    # an error on frequencies the model saw costs nothing: sample 0's constant under a low-pass mask
    kept_dc = frequency_masks(torch.tensor([True, True]), 2, 2, 0.5)
    assert frequency_loss(target + offsets, target, kept_dc)[0] < 1e-5


def test_pixel_masks_keep_the_lowest_noise_patches_and_the_loss_is_the_mean_on_the_removed_pixels():
    noise = torch.tensor([[[0.3, 0.1], [0.4, 0.2]]])
    expected = torch.zeros(4, 4)
    expected[0:2, 2:4] = 1  # the one kept patch: the lowest noise (0.1), top right
    torch.testing.assert_close(patch_masks(noise, keep=1, patch_size=2)[0, 0], expected)

    technique = PixelMask(mask_ratio=0.75, patch_size=2)
    images = torch.rand(3, 1, 4, 4) + 1
    corrupted, masks = technique.corrupt(images)
    assert (masks.sum((1, 2, 3)) == 4).all()  # int(4 patches * 0.25) = 1 patch of 4 pixels kept per image
    torch.testing.assert_close(corrupted, images * masks)
    prediction = images.clone()
    prediction[masks.expand_as(images) == 0] += 0.5  # off by 0.5 on every removed pixel, exact on the kept ones
    prediction[masks.expand_as(images) == 1] += 9.0  # the kept pixels are not scored
    torch.testing.assert_close(technique.reconstruction_loss(prediction, images, masks), torch.full((3,), 0.25))


def test_mfm_draws_low_pass_with_sample_ratio_and_refuses_inputs_that_are_not_images():
    images = torch.rand(8, 1, 8, 8)
    _, low = MFM(mask_radius=0.25, sample_ratio=1.0).corrupt(images)
    _, high = MFM(mask_radius=0.25, sample_ratio=0.0).corrupt(images)
    torch.testing.assert_close(low, disc(8, 8, 2.0).expand(8, 1, 8, 8))  # radius 0.25 x 8 px
    torch.testing.assert_close(high, 1 - low)
    # flat inputs without image_shape: refused at setup, naming the fix
    module = registry.example_module()
    trainer = registry.example_trainer(max_epochs=1, limit_train_batches=1, callbacks=[MFM()])
    with pytest.raises(TechniqueConfigError, match="MFM: the inputs are not .* images.*Fix: give image_shape"):
        trainer.fit(module, datamodule=registry.example_data())


def test_finetune_protocol_masked_modeling_objectives_and_from_scratch_arms(tmp_path):
    with pytest.raises(ClaimError, match="mfm masks images"):
        FinetuneProtocol("c", {"scenario": "text", "pretrain_objective": "mfm"})
    with pytest.raises(ClaimError, match="pretrain_init_args"):
        FinetuneProtocol("c", {"pretrain_init_args": {"mask_radius": 0.25}})
    with pytest.raises(ClaimError, match="arm a: pretrain_objective must be one of"):
        FinetuneProtocol("c", {}).check_arm("a", {"pretrain_objective": "mae"})
    settings = {"pretrain_objective": "mfm", "pretrain_init_args": {"mask_radius": 0.25}, "pretrain_epochs": 1,
                "trainer": {"limit_train_batches": 2, "limit_val_batches": 0}}
    protocol = FinetuneProtocol("c", settings)
    checkpoint, model = protocol.pretrained(0, tmp_path)
    L.seed_everything(0, verbose=False)
    initial = protocol.module(1e-3)
    state = load_state_dict_file(checkpoint)
    assert state.keys() == initial.state_dict().keys()  # the decoder is dropped: every arm loads it as is
    torch.testing.assert_close(state["head.weight"], initial.head.weight.detach())  # labels unused: the head is untouched
    assert not torch.equal(state["backbone.blocks.0.weight"], initial.backbone.blocks[0].weight.detach())
    # an arm's own objective: pixel masking is a pretraining of its own; none is the seeded initialisation
    pixel, _ = protocol.pretrained(0, tmp_path, {"pretrain_objective": "pixel_mask"})
    assert pixel != checkpoint
    scratch, fresh = protocol.pretrained(0, tmp_path, {"pretrain_objective": "none"})
    assert scratch is None
    torch.testing.assert_close(fresh.state_dict()["backbone.blocks.0.weight"], initial.backbone.blocks[0].weight)


def test_export_saves_the_module_without_the_decoder_and_never_overwrites(tmp_path):
    path = tmp_path / "pretrained.pt"

    def fit() -> torch.nn.Module:
        module = registry.example_module()
        trainer = registry.example_trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=0,
                                           callbacks=[PixelMask(image_shape=(1, 8, 8), export_path=str(path))])
        trainer.fit(module, datamodule=registry.example_data())
        return module

    module = fit()
    state = load_state_dict_file(path)
    assert "masked_modeling_decoder.weight" in module.state_dict()
    assert state.keys() == registry.example_module().state_dict().keys()  # what a probe loads strictly
    with pytest.raises(TechniqueConfigError, match="exists .nothing is overwritten.*Fix: choose a new export_path"):
        fit()
