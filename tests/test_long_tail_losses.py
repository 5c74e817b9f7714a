"""Long-tail losses and the contrastive long-tail techniques against hand-computed cases:
class-balanced weights, logit adjustment, the contrastive terms (SimCLR, SupCon, SBCL) on a
hand-made batch against their definitions written as loops, SBCL's subclass counts and
clustering, RCAL's Gaussian recovery and sampling, and RCAL's head retraining."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from reglab import registry
from reglab.callbacks import RCAL, ClassBalancedLoss, LogitAdjustedLoss
from reglab.callbacks.baselines.class_balanced_loss import class_balanced_weights, class_weighted_cross_entropy
from reglab.callbacks.baselines.logit_adjusted_loss import log_prior, logit_adjusted_cross_entropy
from reglab.callbacks.noisy_labels.rcal import recover_gaussians, sample_calibrated
from reglab.callbacks.noisy_labels.sbcl import cluster_subclasses, sbcl_loss, subclass_counts, supcon_loss
from reglab.datamodules import DigitsDataModule, LongTail
from reglab.nn.contrastive import augmented_view, nt_xent
from reglab.technique import TechniqueConfigError, training_class_counts


# -- class-balanced and logit-adjusted losses ------------------------------------------------------
def test_class_balanced_weights_are_inverse_effective_numbers_summing_to_c():
    beta = 0.9
    effective = [(1 - beta**n) / (1 - beta) for n in (100, 10, 1)]
    raw = [1 / e for e in effective]
    expected = [3 * w / sum(raw) for w in raw]
    torch.testing.assert_close(class_balanced_weights(torch.tensor([100, 10, 1]), beta).double(),
                               torch.tensor(expected, dtype=torch.float64), rtol=1e-6, atol=1e-7)


def test_class_weighted_cross_entropy_hard_and_soft_targets():
    logits = torch.tensor([[2.0, 0.0], [0.5, 1.5]])
    weights = torch.tensor([0.4, 1.6])
    log_p = [[2 - math.log(math.exp(2) + 1), -math.log(math.exp(2) + 1)],
             [0.5 - math.log(math.exp(0.5) + math.exp(1.5)), 1.5 - math.log(math.exp(0.5) + math.exp(1.5))]]
    hard = class_weighted_cross_entropy(logits, torch.tensor([1, 0]), weights)
    torch.testing.assert_close(hard, torch.tensor([-1.6 * log_p[0][1], -0.4 * log_p[1][0]]))
    soft = class_weighted_cross_entropy(logits, torch.tensor([[0.25, 0.75], [1.0, 0.0]]), weights)
    torch.testing.assert_close(soft, torch.tensor([-(0.25 * 0.4 * log_p[0][0] + 0.75 * 1.6 * log_p[0][1]),
                                                   -0.4 * log_p[1][0]]))


def test_logit_adjustment_adds_tau_log_prior_to_the_logits():
    counts, logits, tau = torch.tensor([3, 1]), torch.tensor([[1.0, 2.0]]), 1.5
    adjusted = [1.0 + tau * math.log(0.75), 2.0 + tau * math.log(0.25)]
    ce = [-(a - math.log(sum(math.exp(b) for b in adjusted))) for a in adjusted]
    prior = log_prior(counts)
    hard = logit_adjusted_cross_entropy(logits, torch.tensor([0]), prior, tau)
    torch.testing.assert_close(hard, torch.tensor([ce[0]]))
    soft = logit_adjusted_cross_entropy(logits, torch.tensor([[0.3, 0.7]]), prior, tau)
    torch.testing.assert_close(soft, torch.tensor([0.3 * ce[0] + 0.7 * ce[1]]))
    assert logit_adjusted_cross_entropy(logits, torch.tensor([0]), prior, 0.0).item() == pytest.approx(
        F.cross_entropy(logits, torch.tensor([0])).item())


def test_class_counts_come_from_the_long_tailed_training_split_or_fail_with_the_fix():
    data = DigitsDataModule(flatten=True, long_tail=LongTail(imbalance_ratio=10.0))
    data.setup("fit")
    trainer = SimpleNamespace(datamodule=data)
    counts = training_class_counts(ClassBalancedLoss(), trainer)
    assert counts.tolist() == torch.bincount(data.train_dataset.targets, minlength=10).tolist()
    assert counts[0] >= 9 * counts[9]
    with pytest.raises(TechniqueConfigError, match="LogitAdjustedLoss: class_counts has 2 entries .* Fix:"):
        training_class_counts(LogitAdjustedLoss(), trainer, [5, 5])
    with pytest.raises(TechniqueConfigError, match="Fix: use a reglab DataModule, or pass class_counts"):
        training_class_counts(LogitAdjustedLoss(), SimpleNamespace(datamodule=None))
    assert training_class_counts(ClassBalancedLoss(), SimpleNamespace(datamodule=None), [4, 1]).tolist() == [4, 1]


# -- contrastive terms against their definitions ------------------------------------------------------
VIEW1 = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
VIEW2 = torch.tensor([[0.8, 0.6], [0.6, 0.8], [-1.0, 1.0]])


def _unit_rows():
    z = torch.cat([VIEW1, VIEW2]).double()
    return z / z.norm(dim=1, keepdim=True)


def _reference(positives_of, denominator_of, temperature_of):
    """mean over anchors of -mean_{p in P_i} log(exp(s_ip/t_i) / sum_{k in D_i} exp(s_ik/t_i)), by loops."""
    z = _unit_rows()
    terms = []
    for i in range(len(z)):
        t = temperature_of(i)
        norm = sum(math.exp(float(z[i] @ z[k]) / t) for k in denominator_of(i))
        logs = [float(z[i] @ z[p]) / t - math.log(norm) for p in positives_of(i)]
        terms.append(sum(logs) / len(logs))
    return terms


def test_nt_xent_matches_its_definition():
    n = len(VIEW1)
    terms = _reference(lambda i: [(i + n) % (2 * n)], lambda i: [k for k in range(2 * n) if k != i], lambda i: 0.5)
    assert nt_xent(VIEW1, VIEW2, 0.5).item() == pytest.approx(-sum(terms) / len(terms), rel=1e-5)


def test_supcon_matches_its_definition():
    labels, n = [0, 0, 1], len(VIEW1)
    lab = labels * 2
    terms = _reference(lambda i: [k for k in range(2 * n) if k != i and lab[k] == lab[i]],
                       lambda i: [k for k in range(2 * n) if k != i], lambda i: 0.1)
    loss = supcon_loss(VIEW1, VIEW2, torch.tensor(labels), temperature=0.1, base_temperature=0.07)
    assert loss.item() == pytest.approx(-(0.1 / 0.07) * sum(terms) / len(terms), rel=1e-5)


def test_sbcl_loss_matches_the_bi_granularity_definition():
    """Samples 0 and 1 are one class in two subclasses, sample 2 another class; the class term's
    positives are the same class's other subclasses and the anchor's own other view, its
    denominator everything outside the anchor's subclass and that view."""
    labels, subclasses, n = [0, 0, 1], [0, 1, 2], len(VIEW1)
    lab, sub = labels * 2, subclasses * 2
    class_temperature = torch.tensor([0.2, 0.05])
    others = lambda i: [k for k in range(2 * n) if k != i]  # noqa: E731
    other_view = lambda i: (i + n) % (2 * n)  # noqa: E731
    sub_terms = _reference(lambda i: [k for k in others(i) if sub[k] == sub[i]], others, lambda i: 0.1)
    cls_terms = _reference(
        lambda i: sorted({k for k in others(i) if lab[k] == lab[i] and sub[k] != sub[i]} | {other_view(i)}),
        lambda i: sorted({k for k in others(i) if sub[k] != sub[i]} | {other_view(i)}),
        lambda i: float(class_temperature[lab[i]]),
    )
    expected = sum(-(0.1 / 0.07) * s - 0.25 * c for s, c in zip(sub_terms, cls_terms)) / (2 * n)
    loss = sbcl_loss(VIEW1, VIEW2, torch.tensor(labels), torch.tensor(subclasses), class_temperature,
                     temperature=0.1, base_temperature=0.07, gamma=0.25)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


# -- SBCL's subclasses ------------------------------------------------------------------------------
def test_subclass_counts_follow_the_official_floor_rule():
    assert subclass_counts(torch.tensor([108, 50, 23, 10])).tolist() == [10, 5, 2, 1]
    assert subclass_counts(torch.tensor([100, 40, 12, 5])).tolist() == [10, 4, 1, 1]  # subclasses of >= 10
    assert subclass_counts(torch.tensor([60, 20])).tolist() == [3, 1]
    assert subclass_counts(torch.tensor([60, 20]), min_subclass_size=30).tolist() == [2, 1]


def test_clustering_gives_each_class_its_number_of_subclasses_in_its_own_id_range():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(90, 8, generator=generator)
    labels = torch.tensor([0] * 60 + [1] * 20 + [2] * 10)
    counts = torch.tensor([3, 2, 1])
    subclasses = cluster_subclasses(features, labels, counts, 3, seed=0)
    assert set(subclasses[labels == 0].tolist()) == {0, 1, 2}
    assert set(subclasses[labels == 1].tolist()) == {3, 4}
    assert set(subclasses[labels == 2].tolist()) == {5}
    assert torch.equal(subclasses, cluster_subclasses(features, labels, counts, 3, seed=0))


# -- RCAL's recovery and sampling ------------------------------------------------------------------
def test_gaussian_recovery_drops_outliers_and_calibrates_the_tail_covariance():
    generator = torch.Generator().manual_seed(0)
    scale = torch.tensor([1.0, 2.0])
    head0 = torch.randn(300, 2, generator=generator) * scale
    head1 = torch.randn(300, 2, generator=generator) * scale + torch.tensor([10.0, 0.0])
    tail = torch.randn(8, 2, generator=generator) * 0.3 + torch.tensor([0.0, 10.0])
    outlier = torch.tensor([[60.0, 60.0]])  # a mislabelled far-away sample of class 0
    features = torch.cat([head0, outlier, head1, tail])
    labels = torch.tensor([0] * 301 + [1] * 300 + [2] * 8)
    means, covariances, counts, inliers = recover_gaussians(features, labels, 3, lof_neighbors=20, k_nearest=1, alpha=0.1)
    assert not inliers[300] and counts[0] < 301 and counts[1] <= 300
    torch.testing.assert_close(means[0].float(), torch.zeros(2), atol=0.3, rtol=0)
    tail_kept = tail.double()[inliers[601:]]
    head0_kept = torch.cat([head0, outlier]).double()[inliers[:301]]
    # class 2 is a tail class (8 < mean count); its nearest head class by mean is class 0
    raw = (torch.cov(tail_kept.T) + torch.cov(head0_kept.T)) / 2
    expected = raw + 0.1 * raw.diagonal().mean() * torch.eye(2, dtype=torch.float64)
    torch.testing.assert_close(covariances[2], expected)
    torch.testing.assert_close(means[2], tail_kept.mean(0))
    head_raw = torch.cov(head0_kept.T)
    torch.testing.assert_close(covariances[0], head_raw + 0.1 * head_raw.diagonal().mean() * torch.eye(2, dtype=torch.float64))


def test_sampling_tops_every_class_up_with_draws_of_its_gaussian():
    means = torch.tensor([[0.0, 0.0], [5.0, -3.0]], dtype=torch.float64)
    covariances = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[2.0, 0.8], [0.8, 1.0]]], dtype=torch.float64)
    counts = torch.tensor([20000, 10])
    features, labels = sample_calibrated(means, covariances, counts, torch.Generator().manual_seed(0))
    assert features.shape == (19990, 2) and features.dtype == torch.float32
    assert labels.tolist() == [1] * 19990
    torch.testing.assert_close(features.double().mean(0), means[1], atol=0.05, rtol=0)
    torch.testing.assert_close(torch.cov(features.double().T), covariances[1], atol=0.08, rtol=0)


# -- views and head retraining ---------------------------------------------------------------------
def test_views_depend_only_on_seed_and_step_and_keep_the_shape():
    images = torch.rand(4, 1, 8, 8)
    assert torch.equal(augmented_view(images, step=3, seed=1), augmented_view(images, step=3, seed=1))
    assert not torch.equal(augmented_view(images, step=3, seed=1), augmented_view(images, step=4, seed=1))
    assert augmented_view(images.flatten(1), step=0, seed=0).shape == (4, 64)
    with pytest.raises(ValueError, match="not a square image"):
        augmented_view(torch.rand(4, 10), step=0, seed=0)


def test_rcal_retrains_the_head_at_the_epoch_end_and_the_checkpoint_holds_it(tmp_path):
    """lam = 0 keeps the backbone's training identical; only the calibration differs."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    def fit(calibrate_from_epoch, **extra):
        module = registry.example_module()
        technique = RCAL(lam=0.0, calibrate_from_epoch=calibrate_from_epoch, head_steps=30)
        trainer = registry.example_trainer(max_steps=5, callbacks=[technique, *extra.pop("callbacks", [])], **extra)
        trainer.fit(module, datamodule=registry.example_data())
        return module

    plain = fit(calibrate_from_epoch=1)  # 5 steps are epoch 0: never calibrates
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    calibrated = fit(calibrate_from_epoch=0, callbacks=[checkpoint], enable_checkpointing=True)
    for key, value in plain.backbone.state_dict().items():
        torch.testing.assert_close(calibrated.backbone.state_dict()[key], value, rtol=0, atol=0)
    assert not torch.allclose(plain.head.weight, calibrated.head.weight)
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)["state_dict"]
    torch.testing.assert_close(saved["head.weight"], calibrated.head.weight.detach(), rtol=0, atol=0)


def test_rcal_without_max_epochs_or_calibrate_from_epoch_fails_at_setup_with_the_fix():
    trainer = registry.example_trainer(max_steps=2, callbacks=[RCAL()])
    with pytest.raises(TechniqueConfigError, match="RCAL: it retrains the head at the end of the last epoch.*Fix: set"):
        trainer.fit(registry.example_module(), datamodule=registry.example_data())
