"""Core-tuning's maths against hand-computed cases: hard pair mining, the mixtures, the focal
supervised contrastive loss; and its projection head in checkpoints."""

from __future__ import annotations

import math

import pytest
import torch

from reglab import registry
from reglab.callbacks import CoreTuning
from reglab.callbacks.domain_generalization.core_tuning import focal_supcon_loss, hard_pair_mixtures, hardest_pairs
from reglab.tasks import ClassificationModule


def test_hardest_pairs_are_the_least_similar_positive_and_the_most_similar_negative():
    features = torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [1.0, 0.2]])
    labels = torch.tensor([0, 0, 0, 1])
    positive, negative = hardest_pairs(features, labels)
    # sample 0: positives 1 (cos 0.995) and 2 (cos 0) -> 2; its only negative is 3
    # sample 2: positives 0 (cos 0) and 1 (cos 0.0995) -> 0; negative 3
    # sample 3 (alone in class 1): no positive -> itself; negatives 0 (cos 0.981), 1 (0.995), 2 (0.196) -> 1
    assert positive.tolist() == [2, 2, 0, 3]
    assert negative.tolist() == [3, 3, 3, 1]


def test_the_mixtures_by_hand():
    features, labels = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 1])
    targets = torch.eye(2)
    mixed, mixed_targets = hard_pair_mixtures(features, targets, labels, order=torch.tensor([1, 0]),
                                              lam_negative=torch.tensor([0.8, 0.9]), lam_positive=torch.tensor([0.25, 0.5]))
    # negatives: 0.2 f0 + 0.8 f1 and 0.1 f1 + 0.9 f0; positives (none: the sample itself) with the other sample
    # as hardest negative: 0.25 f0 + 0.75 f1 and 0.5 f1 + 0.5 f0
    expected = torch.tensor([[0.2, 0.8], [0.9, 0.1], [0.25, 0.75], [0.5, 0.5]])
    torch.testing.assert_close(mixed, expected)
    torch.testing.assert_close(mixed_targets, expected)  # one-hot labels along the feature axes


def test_focal_supcon_loss_by_hand():
    embeddings = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    # anchors 0 and 1 are each other's positive: p = e / (e + 1), log p = 1 - log(e + 1), weight 1 - p;
    # each anchor's sum is divided by the 3 columns, the total by the 2 anchors that have a positive
    log_p = 1 - math.log(math.e + 1)
    per_anchor = -(1 - math.exp(log_p)) * log_p / 3
    loss = focal_supcon_loss(embeddings, torch.tensor([0, 0, 1]), temperature=1.0)
    assert math.isclose(float(loss), per_anchor, rel_tol=1e-6)
    assert float(focal_supcon_loss(embeddings, torch.tensor([0, 1, 2]), temperature=1.0)) == 0.0


def test_a_fit_trains_the_projection_head_and_its_checkpoint_loads_into_a_bare_module(tmp_path):
    module, technique = registry.example_module(), CoreTuning(contrast_dim=8)
    trainer = registry.example_trainer(max_steps=2, callbacks=[technique])
    trainer.fit(module, datamodule=registry.example_data())
    projection = module.core_tuning_projection
    assert projection[2].weight.shape == (8, 32) and projection[0].weight.grad is not None
    assert technique.parameter_counts["trainable"] == sum(p.numel() for p in module.parameters())
    path = tmp_path / "core.ckpt"
    trainer.save_checkpoint(path)
    restored = ClassificationModule.load_from_checkpoint(path)
    torch.testing.assert_close(restored.core_tuning_projection[2].weight, projection[2].weight)


def test_bad_arguments_are_refused():
    for kwargs in ({"eta": -1.0}, {"mixup_alpha": 0.0}, {"temperature": 0.0}, {"contrast_dim": 0}):
        with pytest.raises(ValueError, match="CoreTuning"):
            CoreTuning(**kwargs)
