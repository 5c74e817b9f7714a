"""Tests of FPGM (callbacks/domain_generalization/fpgm.py): the radial profile, the amplitude
perturbation (phase and energy kept, identity cases), the edge regions, the Dice loss, the prior's
EMA and which images the consistency reads."""

from __future__ import annotations

import doctest

import lightning
import pytest
import torch

from reglab.callbacks import FPGM
from reglab.callbacks.domain_generalization import fpgm as fpgm_module
from reglab.callbacks.domain_generalization.fpgm import (
    centred_amplitude,
    dice_loss,
    edge_regions,
    frequency_prior_perturbation,
    radial_profile,
)
from reglab.datamodules import UNLABELLED, DigitScenesDataModule
from reglab.registry import example_trainer
from reglab.tasks import SegmentationModule
from reglab.technique import TechniqueConfigError


def _radius(height: int, width: int) -> torch.Tensor:
    y, x = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    return ((y - height // 2) ** 2 + (x - width // 2) ** 2).float().sqrt().floor().long()


def test_radial_profile_is_the_mean_over_each_integer_radius_below_half_the_side():
    amplitude = torch.arange(36.0).view(6, 6)
    radius = _radius(6, 6)
    expected = torch.stack([amplitude[radius == r].mean() for r in range(3)])  # R = 6 // 2; corners (r >= 3) left out
    torch.testing.assert_close(radial_profile(amplitude), expected)
    # by hand: radius 0 is the centre (3, 3) = 21; radius 1 the 8 neighbours, whose mean is the centre's
    assert radial_profile(amplitude)[:2].tolist() == [21.0, 21.0]
    assert radial_profile(torch.ones(2, 3, 8, 8)).shape == (2, 3, 4)


def test_perturbation_keeps_the_phase_and_the_energy_and_reaches_the_prior_at_gamma_one():
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 8, 8, generator=generator)
    prior = torch.tensor([4.0, 2.0, 1.0, 1.0])
    for gamma in (0.05, 0.5, 1.0):
        perturbed = frequency_prior_perturbation(images, prior, gamma)
        spectrum, original = torch.fft.fft2(perturbed, norm="ortho"), torch.fft.fft2(images, norm="ortho")
        # the same phase wherever the original has one: F' is a positive multiple of F
        ratio = spectrum / original
        torch.testing.assert_close(ratio.imag, torch.zeros_like(ratio.imag), atol=1e-4, rtol=0)
        assert (ratio.real > 0).all()
        own, new = radial_profile(centred_amplitude(images)[0]), radial_profile(centred_amplitude(perturbed)[0])
        energy = own.sum(-1, keepdim=True)
        torch.testing.assert_close(new.sum(-1, keepdim=True), energy, rtol=1e-4, atol=1e-4)
        # p' = E ((1 - gamma) p / E + gamma P / sum P), at every radius
        torch.testing.assert_close(new, (1 - gamma) * own + gamma * energy * prior / prior.sum(), rtol=1e-4, atol=1e-4)


def test_perturbation_is_the_identity_at_gamma_zero_and_for_a_radially_symmetric_amplitude_at_its_own_profile():
    generator = torch.Generator().manual_seed(1)
    images = torch.rand(3, 1, 8, 8, generator=generator)
    assert frequency_prior_perturbation(images, torch.rand(4), gamma=0.0) is images
    # an image whose amplitude depends on the (clamped) radius only: a real image's phase, a radial amplitude
    phase = torch.fft.fft2(images, norm="ortho").angle()
    radial = torch.tensor([5.0, 3.0, 2.0, 0.5])
    amplitude = torch.fft.ifftshift(radial[_radius(8, 8).clamp(max=3)], dim=(-2, -1))
    symmetric = torch.fft.ifft2(torch.polar(amplitude.expand_as(phase), phase), norm="ortho").real
    own = radial_profile(centred_amplitude(symmetric)[0])[0, 0]
    torch.testing.assert_close(own, radial, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(frequency_prior_perturbation(symmetric, own, gamma=0.7), symmetric, rtol=1e-4, atol=1e-5)
    # the code's radial averaging: an anisotropic amplitude changes even at its own profile
    anisotropic = images[:1]
    own = radial_profile(centred_amplitude(anisotropic)[0])[0, 0]
    assert not torch.allclose(frequency_prior_perturbation(anisotropic, own, gamma=0.7), anisotropic, atol=1e-3)


def test_edge_regions_mark_every_class_boundary_and_the_dilation_widens_them():
    labels = torch.zeros(1, 7, 7, dtype=torch.long)
    labels[0, 2:5, 2:5] = 3
    thin = edge_regions(labels, dilation=1)[0]
    # Sobel's 3x3 support: the square's border and the ring around it, not its centre
    expected = torch.zeros(7, 7, dtype=torch.bool)
    expected[1:6, 1:6] = True
    expected[3, 3] = False
    assert torch.equal(thin, expected)
    wide = edge_regions(labels, dilation=3)[0]
    assert wide.all()  # one pixel more on every side fills the 7x7 canvas (the centre too)


def test_dice_loss_by_hand_and_only_on_the_kept_positions():
    probs = torch.tensor([[0.9, 0.2, 0.5], [0.1, 0.8, 0.5]]).unsqueeze(0)  # (N=1, C=2, 3 positions)
    pseudo = torch.tensor([[0, 1, 1]])
    keep = torch.tensor([[True, True, False]])
    # class 0: I = 0.9, sum s^2 = 0.81 + 0.04, sum y^2 = 1; class 1: I = 0.8, sum s^2 = 0.01 + 0.64, sum y^2 = 1
    smooth = 1e-5
    class0 = 1 - (2 * 0.9 + smooth) / (0.85 + 1 + smooth)
    class1 = 1 - (2 * 0.8 + smooth) / (0.65 + 1 + smooth)
    assert dice_loss(probs, pseudo, keep).item() == pytest.approx((class0 + class1) / 2, abs=1e-6)
    changed = probs.clone()
    changed[0, :, 2] = torch.tensor([1.0, 0.0])  # the dropped position does not count
    assert dice_loss(changed, pseudo, keep).item() == pytest.approx(dice_loss(probs, pseudo, keep).item(), abs=1e-7)
    assert dice_loss(probs, pseudo, torch.zeros_like(keep)).item() == 0.0


class CountingModule(SegmentationModule):
    """Counts the extra forward passes FPGM makes (``forward``; the step itself uses ``forward_step``)."""

    calls = 0

    def forward(self, x):
        type(self).calls += 1
        return super().forward(x)


def _step(module, technique, batch):
    out = module.forward_step(batch)
    return out, technique.loss_terms(out, module)


def test_prior_is_an_ema_of_the_labelled_images_edge_profiles_and_the_consistency_reads_the_unlabelled_ones():
    torch.manual_seed(0)
    module = CountingModule(num_classes=3, input_shape=(1, 8, 8))
    images = torch.rand(4, 1, 8, 8)
    labels = torch.zeros(4, 8, 8, dtype=torch.long)
    labels[:, 2:6, 3:6] = 1
    labels[:, 5:7, 1:3] = 2
    labels[2:] = 255  # images 2 and 3 unlabelled
    batch = {"input": images, "target": labels}
    fpgm = FPGM(momentum=0.5, threshold=0.0)

    def edge_profile(chosen):
        grey = images[chosen, 0] * edge_regions(labels[chosen], 3)
        return radial_profile(centred_amplitude(grey)[0]).mean(0)

    CountingModule.calls = 0
    _, terms = _step(module, fpgm, batch)
    torch.testing.assert_close(fpgm.prior, edge_profile([0, 1]))
    assert CountingModule.calls == 1 and terms["consistency"] > 0
    first = fpgm.prior.clone()
    batch2 = {"input": images.flip(0), "target": labels.flip(0)}  # now images 1, 0 labelled (positions 2, 3)
    _, _ = _step(module, fpgm, batch2)
    images, labels = batch2["input"], batch2["target"]
    torch.testing.assert_close(fpgm.prior, 0.5 * first + 0.5 * edge_profile([2, 3]))
    # every image labelled: no unlabelled image, no extra pass, a zero term (unless unlabelled_only=False)
    CountingModule.calls = 0
    labelled = {"input": batch["input"], "target": batch["target"].clamp(max=2)}
    _, terms = _step(module, FPGM(threshold=0.0), labelled)
    assert CountingModule.calls == 0 and terms["consistency"] == 0
    _, terms = _step(module, FPGM(threshold=0.0, unlabelled_only=False), labelled)
    assert CountingModule.calls == 1 and terms["consistency"] > 0


def test_state_round_trips_and_a_batch_without_labelled_images_leaves_the_prior_alone():
    module = SegmentationModule(num_classes=3, input_shape=(1, 8, 8))
    unlabelled = {"input": torch.rand(2, 1, 8, 8), "target": torch.full((2, 8, 8), 255)}
    fpgm = FPGM()
    _, terms = _step(module, fpgm, unlabelled)
    assert fpgm.prior is None and fpgm.state_dict() == {} and terms["consistency"] == 0
    fpgm.prior = torch.tensor([1.0, 2.0, 3.0, 4.0])
    _step(module, fpgm, unlabelled)
    assert torch.equal(fpgm.prior, torch.tensor([1.0, 2.0, 3.0, 4.0]))
    restored = FPGM()
    restored.load_state_dict(fpgm.state_dict())
    assert torch.equal(restored.prior, fpgm.prior)


def test_flat_inputs_need_their_image_shape():
    fpgm = FPGM(image_shape=[1, 8, 8])
    assert fpgm.images(torch.zeros(5, 64)).shape == (5, 1, 8, 8)
    with pytest.raises(TechniqueConfigError, match="FPGM: it perturbs images.*Fix: .*image_shape"):
        FPGM().images(torch.zeros(5, 64))
    with pytest.raises(TechniqueConfigError, match="64 features, which image_shape=\\[1, 4, 4\\]"):
        FPGM(image_shape=[1, 4, 4]).images(torch.zeros(5, 64))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"gamma": 1.5}, "gamma"), ({"momentum": 1.0}, "momentum"), ({"dilation": 2}, "odd"),
     ({"threshold": 2.0}, "threshold"), ({"image_shape": [8, 8]}, "image_shape")],
)
def test_bad_arguments_fail_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FPGM(**kwargs)


def test_fully_labelled_training_data_is_refused_at_setup_unless_every_image_is_used():
    data = DigitScenesDataModule(num_train=16, num_val=4, num_test=4, batch_size=8)
    model = SegmentationModule(num_classes=data.num_classes, input_shape=data.input_shape)
    with pytest.raises(TechniqueConfigError, match="every training image of DigitScenesDataModule has labels.*unlabelled_only"):
        example_trainer(max_steps=1, callbacks=[FPGM()]).fit(model, datamodule=data)
    example_trainer(max_steps=1, limit_val_batches=0, callbacks=[FPGM(unlabelled_only=False)]).fit(model, datamodule=data)


def test_a_short_semi_supervised_fit_on_the_scenes_trains_the_consistency(one_thread):
    lightning.seed_everything(0, verbose=False)
    data = DigitScenesDataModule(num_train=32, num_val=8, num_test=8, batch_size=8, num_labelled=8)
    model = SegmentationModule(num_classes=data.num_classes, input_shape=data.input_shape)
    fpgm = FPGM(threshold=0.0)
    trainer = example_trainer(max_steps=3, limit_val_batches=1, callbacks=[fpgm])
    trainer.fit(model, datamodule=data)
    assert "train/fpgm/consistency" in trainer.callback_metrics
    assert fpgm.prior is not None and fpgm.prior.shape == (16,) and (fpgm.prior > 0).all()
    assert (data.train_dataset.targets[8:] == UNLABELLED).all()


def test_docstring_examples_run():
    assert doctest.testmod(fpgm_module, verbose=False).failed == 0
