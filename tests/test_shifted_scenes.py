"""Tests of the semi-supervised, domain-shifted segmentation scenes: SceneStyle, num_labelled (the
unlabelled scenes, the oversampled labelled ones), the foreground Dice and the task loss over the
labelled images."""

from __future__ import annotations

import pytest
import torch

from reglab.datamodules import UNLABELLED, DigitScenesDataModule, SceneStyle, apply_scene_style
from reglab.mixins import StepOutput
from reglab.tasks import SegmentationModule
from reglab.tasks.segmentation import IGNORE_INDEX, ForegroundDice, dense_cross_entropy_per_sample


def test_style_by_hand_contrast_brightness_and_clipping():
    images = torch.tensor([0.0, 0.5, 1.0, 1.0]).view(1, 1, 2, 2)
    styled = apply_scene_style(images, SceneStyle(contrast=0.6, brightness=0.5))
    torch.testing.assert_close(styled, torch.tensor([0.5, 0.8, 1.0, 1.0]).view(1, 1, 2, 2))  # 1.1 clipped to 1
    assert torch.equal(images, torch.tensor([0.0, 0.5, 1.0, 1.0]).view(1, 1, 2, 2)), "the input is left unchanged"


def test_style_blur_keeps_the_mean_and_the_grating_has_its_amplitude_and_period():
    images = torch.zeros(3, 1, 16, 16)
    images[:, :, 6:10, 6:10] = 1.0
    blurred = apply_scene_style(images, SceneStyle(blur=1.0))
    assert blurred.max() < 1.0 and blurred[:, :, 7, 7].min() > 0.5
    torch.testing.assert_close(blurred.mean(), images.mean(), atol=1e-3, rtol=0)
    textured = apply_scene_style(torch.full((3, 1, 16, 16), 0.5), SceneStyle(texture=0.2, texture_period=4, seed=3))
    deviation = textured - 0.5
    assert deviation.abs().max() <= 0.2 + 1e-6 and deviation.abs().max() > 0.15
    # sin(2π along / 4 + φ): the grating changes sign every half period along its direction, never over a full one
    spectrum = torch.fft.fft2(deviation[:, 0]).abs()
    peak = spectrum.flatten(1).argmax(1)
    radius = torch.stack([torch.minimum(peak // 16, 16 - peak // 16), torch.minimum(peak % 16, 16 - peak % 16)], 1)
    torch.testing.assert_close(radius.float().norm(dim=1), torch.full((3,), 16 / 4), atol=1.0, rtol=0)
    assert not torch.equal(textured[0], textured[1]), "orientation and phase are drawn per image"
    again = apply_scene_style(torch.full((3, 1, 16, 16), 0.5), SceneStyle(texture=0.2, texture_period=4, seed=3))
    assert torch.equal(textured, again)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"contrast": 0.0}, "contrast"), ({"blur": -1.0}, "blur"), ({"texture_period": 1.0}, "texture_period")],
)
def test_bad_styles_fail_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SceneStyle(**kwargs)


def test_test_style_changes_the_test_images_only_and_num_labelled_unlabels_the_other_training_scenes():
    style = SceneStyle(contrast=0.6, brightness=0.25, blur=0.7, texture=0.15, texture_period=3)
    plain = DigitScenesDataModule(num_train=40, num_val=8, num_test=8, batch_size=8)
    shifted = DigitScenesDataModule(num_train=40, num_val=8, num_test=8, batch_size=8, num_labelled=10, test_style=style)
    plain.setup()
    shifted.setup()
    assert torch.equal(shifted.test_dataset.inputs, apply_scene_style(plain.test_dataset.inputs, style))
    assert torch.equal(shifted.test_dataset.targets, plain.test_dataset.targets), "the masks stay"
    assert torch.equal(shifted.val_dataset.inputs, plain.val_dataset.inputs), "validation stays in the training domain"
    assert torch.equal(shifted.train_dataset.inputs, plain.train_dataset.inputs)
    assert torch.equal(shifted.train_dataset.targets[:10], plain.train_dataset.targets[:10])
    assert (shifted.train_dataset.targets[10:] == UNLABELLED).all() and UNLABELLED == IGNORE_INDEX
    # labelled scenes drawn (40 - 10) / 10 = 3 times per epoch: half of an epoch of 60 scenes
    sampler = shifted.train_dataloader().sampler
    assert sampler.epoch_size == 60
    drawn = torch.tensor(list(sampler))
    assert 20 <= int((drawn < 10).sum()) <= 40


def test_num_labelled_must_lie_within_the_training_scenes():
    with pytest.raises(ValueError, match="num_labelled=50 must lie in \\[1, num_train=40\\]"):
        DigitScenesDataModule(num_train=40, num_labelled=50)
    with pytest.raises(TypeError, match="test_style must be a SceneStyle"):
        DigitScenesDataModule(test_style={"contrast": 0.5})


def test_foreground_dice_by_hand_skipping_background_and_ignored_pixels():
    dice = ForegroundDice(3)
    logits = torch.zeros(1, 3, 1, 5)
    logits[0, [0, 1, 1, 2, 2], 0, torch.arange(5)] = 1.0            # predicts 0, 1, 1, 2, 2
    target = torch.tensor([[[0, 1, 2, 2, IGNORE_INDEX]]])
    dice.update(logits, target)
    # class 1: TP 1, FP 1 -> 2/3; class 2: TP 1, FN 1 (pixel 2), the ignored pixel 4 not a FP -> 2/3
    assert dice.compute().item() == pytest.approx(2 / 3, abs=1e-6)


def test_task_loss_is_the_mean_over_the_labelled_images_of_the_batch():
    module = SegmentationModule(num_classes=3, input_shape=(1, 4, 4))
    logits = torch.randn(4, 3, 4, 4)
    target = torch.randint(0, 3, (4, 4, 4))
    target[1:3] = IGNORE_INDEX                                     # two of four images unlabelled
    out = StepOutput(logits=logits, target=target, labels=target)
    per_image = dense_cross_entropy_per_sample(logits, target)
    expected = (per_image[0] + per_image[3]) / 2
    assert module.task_loss(out).mean().item() == pytest.approx(expected.item(), rel=1e-6)
    assert module.task_loss(StepOutput(logits=logits, target=torch.full_like(target, IGNORE_INDEX))).sum() == 0
