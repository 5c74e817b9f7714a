"""ADELE (paper 48): the onset curve and rule, the per-class fit, the correction rules and the
multi-scale consistency against hand-computed cases, and the technique on classification inputs
(flat and images). The shared harness (tests/test_harness.py) covers accumulation, resume, bf16,
stacking and DDP."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from harness import noisy_digits, quiet_trainer, small_module
from reglab.callbacks.noisy_labels.adele import (
    ADELE,
    correct_labels,
    fit_counts,
    fit_onset_curve,
    memorization_started,
    multiscale_consistency,
    onset_curve,
    per_class_fit,
    relative_slope_drop,
    scaled_size,
)
from reglab.datamodules import DigitsDataModule, LabelNoise
from reglab.mixins import StepOutput
from reglab.datamodules.scenes import DigitScenesDataModule, MaskNoise
from reglab.tasks import ClassificationModule
from reglab.tasks.segmentation import SegmentationModule
from reglab.technique import TechniqueConfigError


# -- the curve ----------------------------------------------------------------------------------
def test_onset_curve_values():
    # f(t) = a (1 - exp(-t^b / c)): a = 0.5, b = 0.5, c = 2 at t = 4 -> 0.5 (1 - e^-1)
    assert onset_curve(np.array([4.0]), 0.5, 0.5, 2.0)[0] == pytest.approx(0.5 * (1 - math.exp(-1)))
    assert onset_curve(np.array([0.0]), 0.9, 0.7, 1.0)[0] == 0.0


def test_fit_recovers_the_parameters_of_exact_points():
    x = np.arange(1, 31) / 5
    a, b, c = fit_onset_curve(x, onset_curve(x, 0.8, 0.5, 2.0))
    assert (a, b, c) == pytest.approx((0.8, 0.5, 2.0), rel=1e-4)


def test_fit_stays_in_the_official_bounds():
    x = np.arange(1, 11, dtype=float)
    a, b, c = fit_onset_curve(x, 0.05 * x)  # a straight line: a and b run into their upper bound 1
    assert 0 <= a <= 1 and 0 <= b <= 1 and c >= 0


def test_relative_slope_drop_by_hand():
    # b = c = 1: f'(t) = a e^-t, so |f'(t) - f'(1)| / f'(1) = 1 - e^-(t-1), whatever a
    assert relative_slope_drop(1.0, 0.3, 1.0, 1.0) == 0.0
    assert relative_slope_drop(3.0, 0.3, 1.0, 1.0) == pytest.approx(1 - math.exp(-2))
    assert relative_slope_drop(4.0, 0.9, 1.0, 1.0) == pytest.approx(1 - math.exp(-3))
    # b = 0.5, c = 2: f'(t) / f'(1) = exp(-(sqrt(t) - 1) / 2) / sqrt(t); t = 4 -> e^-0.5 / 2
    assert relative_slope_drop(4.0, 0.7, 0.5, 2.0) == pytest.approx(1 - math.exp(-0.5) / 2)
    # a flat curve has no slope to compare
    assert math.isnan(relative_slope_drop(3.0, 0.0, 1.0, 1.0))
    assert math.isnan(relative_slope_drop(3.0, 0.5, 0.0, 1.0))


def test_onset_is_the_first_epoch_whose_slope_dropped_by_more_than_r():
    x = np.arange(1, 41) / 10  # 10 points per epoch, 4 epochs
    y = onset_curve(x, 0.9, 1.0, 1.0)  # drop 1 - e^-(t-1): 0.865 at t = 3, 0.950 at t = 4
    assert not memorization_started(x[:30], y[:30], 3.0, r=0.9)
    assert memorization_started(x, y, 4.0, r=0.9)
    assert memorization_started(x[:30], y[:30], 3.0, r=0.8)


def test_no_onset_while_the_fit_still_grows_linearly_or_from_too_few_points():
    x = np.arange(1, 41) / 10
    assert not memorization_started(x, 0.05 * x, 4.0, r=0.9)
    assert not memorization_started(x[:2], onset_curve(x[:2], 0.9, 1.0, 1.0), 4.0, r=0.1)


# -- the per-class fit ------------------------------------------------------------------------------
def test_fit_counts_and_iou_by_hand():
    labels = torch.tensor([[0, 0, 1, 1], [2, 2, 9, 1]])
    predicted = torch.tensor([[0, 1, 1, 1], [2, 0, 0, 0]])
    counts = fit_counts(predicted, labels, num_classes=3, ignore_index=9)
    # class 0: TP 1, predicted 3 (the ignored position not counted), labelled 2
    # class 1: TP 2, predicted 3, labelled 3; class 2: TP 1, predicted 1, labelled 2
    assert counts.tolist() == [[1, 2, 1], [3, 3, 1], [2, 3, 2]]
    iou, defined = per_class_fit(counts, dense=True)
    assert iou.tolist() == pytest.approx([1 / 4, 2 / 4, 1 / 2])
    accuracy, _ = per_class_fit(counts, dense=False)
    assert accuracy.tolist() == pytest.approx([1 / 2, 2 / 3, 1 / 2])
    assert defined.all()


def test_a_class_neither_labelled_nor_predicted_has_no_fit():
    counts = fit_counts(torch.tensor([0, 0, 1]), torch.tensor([0, 1, 1]), num_classes=3)
    _, defined = per_class_fit(counts, dense=True)
    assert defined.tolist() == [True, True, False]
    counts = fit_counts(torch.tensor([0, 2, 1]), torch.tensor([0, 1, 1]), num_classes=3)
    assert per_class_fit(counts, dense=True)[1].tolist() == [True, True, True]  # predicted only
    assert per_class_fit(counts, dense=False)[1].tolist() == [True, True, False]


# -- correction -----------------------------------------------------------------------------------
def _probs(classes: list, confidence: float, num_classes: int) -> torch.Tensor:
    """Probabilities putting `confidence` on each entry's class and the rest spread evenly."""
    index = torch.tensor(classes)
    rest = (1 - confidence) / (num_classes - 1)
    probs = torch.full((*index.shape, num_classes), rest).scatter_(-1, index.unsqueeze(-1), confidence)
    return probs.movedim(-1, 1)


def test_classification_correction_by_hand():
    labels = torch.tensor([0, 1, 2, 2])
    probs = torch.tensor([[0.1, 0.9, 0.0], [0.1, 0.9, 0.0], [0.0, 0.7, 0.3], [0.95, 0.05, 0.0]])
    correcting = torch.tensor([False, True, False])
    # sample 0: confident 1, class 1 under correction -> 1; sample 1 already 1; sample 2 not confident;
    # sample 3: confident 0, which is not under correction
    assert correct_labels(labels, probs, correcting, tau=0.8).tolist() == [1, 1, 2, 2]
    assert correct_labels(labels, probs, torch.ones(3, dtype=torch.bool), tau=0.8).tolist() == [1, 1, 2, 0]


def test_dense_correction_rules_by_hand():
    # background 0; sample 0 holds classes 0, 1, 2; sample 1 holds 0 and 3; sample 2 background only
    labels = torch.tensor([
        [[0, 1], [2, 2]],
        [[0, 3], [3, 3]],
        [[0, 0], [0, 0]],
    ])
    predicted = torch.tensor([
        [[1, 1], [1, 3]],   # (1,0): 2 -> 1 allowed; (1,1): 3 is not among the sample's classes
        [[1, 3], [3, 0]],   # the sample holds no class under correction (3 is not): unchanged
        [[2, 0], [0, 0]],   # background only: unconstrained, 2 is under correction
    ])
    correcting = torch.tensor([True, True, True, False])  # background always, classes 1 and 2
    corrected = correct_labels(labels, _probs(predicted.tolist(), 0.9, 4), correcting, tau=0.8, background_class=0)
    assert corrected.tolist() == [
        [[1, 1], [1, 2]],
        [[0, 3], [3, 3]],
        [[2, 0], [0, 0]],
    ]
    # not confident enough: nothing changes
    unchanged = correct_labels(labels, _probs(predicted.tolist(), 0.5, 4), correcting, tau=0.8, background_class=0)
    assert torch.equal(unchanged, labels)


def test_dense_correction_keeps_ignored_pixels_and_refuses_to_wipe_out_objects():
    labels = torch.zeros(1, 10, 10, dtype=torch.long)
    labels[0, :2, :2] = 1  # 4 object pixels
    labels[0, 9, 9] = 255
    background = torch.zeros(1, 10, 10, dtype=torch.long)
    correcting = torch.tensor([True, True])
    # the prediction erases the object: 0 of 4 object pixels left, 100% background -> keep the labels
    corrected = correct_labels(labels, _probs(background.tolist(), 0.9, 2), correcting, 0.8, background_class=0, ignore_index=255)
    assert torch.equal(corrected, labels)
    # the same object pixels erased in a sample that keeps more object -> taken (the guard is per sample)
    labels[0, 5:, 5:9] = 1
    labels[0, 9, 9] = 255
    predicted = labels.clone()
    predicted[0, :2, :2] = 0
    predicted[0, 9, 9] = 1
    corrected = correct_labels(labels, _probs(predicted.clamp_max(1).tolist(), 0.9, 2), correcting, 0.8,
                               background_class=0, ignore_index=255)
    expected = labels.clone()
    expected[0, :2, :2] = 0
    assert torch.equal(corrected, expected)  # the ignored pixel stays 255


# -- consistency ----------------------------------------------------------------------------------
def test_consistency_is_zero_for_identical_views_and_a_jsd_by_hand():
    logits = torch.randn(4, 3, 5, 5).clamp(-2, 2)  # probabilities inside the mixture's clamp [1e-3, 1 - 1e-3]
    assert float(multiscale_consistency([logits, logits.clone()], rho=0.0)) == pytest.approx(0.0, abs=1e-6)
    # two views, one sample, p = (0.9, 0.1) and q = (0.5, 0.5): m = (0.7, 0.3);
    # mean_s KL(p_s || m) = (0.9 ln(0.9/0.7) + 0.1 ln(0.1/0.3) + 0.5 ln(0.5/0.7) + 0.5 ln(0.5/0.3)) / 2
    p, q = torch.tensor([[0.9, 0.1]]).log(), torch.tensor([[0.5, 0.5]]).log()
    expected = (0.9 * math.log(0.9 / 0.7) + 0.1 * math.log(0.1 / 0.3) + 0.5 * math.log(0.5 / 0.7)
                + 0.5 * math.log(0.5 / 0.3)) / 2
    assert float(multiscale_consistency([p, q], rho=0.5)) == pytest.approx(expected, rel=1e-5)
    # the mixture's largest probability 0.7 is below rho: the sample does not count
    assert float(multiscale_consistency([p, q], rho=0.8)) == 0.0


def test_consistency_gradient_reaches_every_view():
    views = [torch.randn(2, 3, requires_grad=True) for _ in range(3)]
    multiscale_consistency(views, rho=0.0).backward()
    assert all(v.grad is not None and v.grad.abs().sum() > 0 for v in views)


# -- the technique --------------------------------------------------------------------------------
def test_arguments_are_checked():
    with pytest.raises(ValueError, match="scales must"):
        ADELE(scales=(0.5, 2.0))
    with pytest.raises(ValueError, match="r must"):
        ADELE(r=1.5)


def test_soft_targets_from_an_earlier_technique_are_refused():
    out = StepOutput(logits=torch.randn(4, 3), target=torch.full((4, 3), 1 / 3), labels=torch.zeros(4, dtype=torch.long))
    with pytest.raises(TechniqueConfigError, match="list adele before"):
        ADELE().transform_targets(out, small_module())


def test_onsets_are_decided_per_class_from_the_recorded_curve():
    adele = ADELE(r=0.9, background_class=2)
    adele._allocate(3)
    adele._dense = True
    points = torch.arange(1, 41, dtype=torch.float64) / 10
    # class 0 saturates (IoU 1 - e^-t); class 1 keeps growing linearly; class 2 is the background
    iou = torch.stack([1 - torch.exp(-points), 0.02 * points, 1 - torch.exp(-points)], dim=1)
    labelled = torch.full_like(iou, 100.0)
    hits = 2 * labelled * iou / (1 + iou)  # IoU = TP / (T + P - TP) with P = T
    step_counts = torch.stack([hits, labelled, labelled], dim=1)
    adele.snapshots, adele.points = step_counts.cumsum(0), points
    adele._decide_onsets(3.0, dense=True)
    assert adele.corrected_since.tolist() == [-1, -1, -1]
    adele._decide_onsets(4.0, dense=True)
    assert adele.corrected_since.tolist() == [4.0, -1, -1]
    assert adele.correcting().tolist() == [True, False, True]  # the background rides along


def test_corrects_targets_of_classes_under_correction_only():
    adele = ADELE(tau=0.5, scales=(1.0,))
    adele._allocate(3)
    labels = torch.tensor([0, 0, 2])
    logits = torch.tensor([[0.0, 5.0, 0.0], [0.0, 0.0, 5.0], [5.0, 0.0, 0.0]])
    module = small_module()
    out = StepOutput(logits=logits, target=labels)
    assert torch.equal(adele.transform_targets(out, module), labels)  # no class under correction yet
    adele.corrected_since[1] = 3.0
    assert adele.transform_targets(out, module).tolist() == [1, 0, 2]
    assert torch.equal(out.labels, labels)


def test_image_classification_gets_the_consistency_term_and_resumes_its_state(tmp_path):
    data = DigitsDataModule(batch_size=128, label_noise=LabelNoise(rate=0.4))
    module = ClassificationModule("cnn", num_classes=10, input_shape=(1, 8, 8), backbone_kwargs={"channels": (8, 8)})
    adele = ADELE(r=0.3, rho=0.0)  # rho 0: every sample counts (a 2-epoch model is not confident yet)
    trainer = quiet_trainer(max_epochs=2, callbacks=[adele])
    trainer.fit(module, datamodule=data)
    assert trainer.callback_metrics["train/adele/consistency"] > 0
    assert len(adele.points) == 2 * min(10, trainer.num_training_batches)
    assert adele.points[-1] == 2.0
    # the curve's counts add up to every training label seen
    assert float(adele.totals[2].sum()) == 2 * data.num_train_samples
    restored = ADELE()
    restored.load_state_dict(adele.state_dict())
    for key, value in adele.state_dict().items():
        assert torch.equal(restored.state_dict()[key], value), key


def test_flat_inputs_skip_the_consistency_term():
    adele = ADELE(r=0.3)
    trainer = quiet_trainer(max_steps=3, callbacks=[adele])
    trainer.fit(small_module(), datamodule=noisy_digits())
    assert not any(key.startswith("train/adele/consistency") for key in trainer.callback_metrics)
    assert len(adele.points) == 3  # 5 batches per epoch < 10 points per epoch: one point per batch


def test_scaled_size_floors_then_rounds_to_the_multiple():
    assert scaled_size((32, 32), 0.7) == (22, 22)  # as F.interpolate(scale_factor=0.7) gives
    assert scaled_size((32, 32), 0.7, multiple=4) == (24, 24)
    assert scaled_size((32, 20), 1.5, multiple=4) == (48, 32)
    assert scaled_size((8, 8), 0.1, multiple=4) == (4, 4)  # never below one multiple


def test_segmentation_scenes_end_to_end():
    """Dense logits (N, C, H, W): the rescaled views fit the U-Net, the curve counts every
    labelled pixel, the ignore index comes from the module, and a class put under correction
    changes the targets."""
    data = DigitScenesDataModule(num_train=32, num_val=8, num_test=8, batch_size=16, mask_noise=MaskNoise(flip=0.5, seed=0))
    module = SegmentationModule(num_classes=11, input_shape=(1, 32, 32), backbone_kwargs={"channels": (4, 8)}, lr=1e-2)
    adele = ADELE(rho=0.0, background_class=0, size_multiple=2)
    trainer = quiet_trainer(max_epochs=2, limit_val_batches=0, callbacks=[adele])
    trainer.fit(module, datamodule=data)
    assert adele.ignore_index == 255
    assert trainer.callback_metrics["train/adele/consistency"] > 0
    assert float(adele.totals[2].sum()) == 2 * 32 * 32 * 32  # every pixel's label, both epochs
    assert adele.correcting() is None or adele.correcting()[0]
    batch = next(iter(data.train_dataloader()))
    module.trainer = None  # outside a fit: the technique's step log only warns
    out = module.forward_step(batch)
    adele.corrected_since.fill_(2.0)  # every class under correction
    adele.tau = 0.0
    corrected = adele.transform_targets(out, module)
    assert corrected.shape == batch["target"].shape and not torch.equal(corrected, batch["target"])
    # with tau 0 and every class under correction, a changed pixel takes the averaged prediction's class
    probs = torch.stack([view.float().softmax(1) for view in out.extras["adele"]]).mean(0)
    changed = corrected != batch["target"]
    assert torch.equal(corrected[changed], probs.argmax(1)[changed])
