"""Sample-quality measures without Inception: the Fréchet distance in a classifier's features, the
classifier's accuracy on conditional samples and the nearest-training-image distance, by hand."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from reglab.bench.protocols import ClaimError
from reglab.generative.measures import (ClassifierFeatures, conditional_accuracy, frechet_distance,
                                        nearest_training_distance, sample_quality)


class FirstPixels(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.width = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)[:, : self.width]


class Readout(nn.Module):
    """A 'classifier' whose features and logits are its input's first ``width`` pixels (through a batch norm)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.backbone = nn.Sequential(FirstPixels(width), nn.BatchNorm1d(width, affine=False))
        self.backbone.feature_dim = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)


def images(values: list[list[float]]) -> torch.Tensor:
    return torch.tensor(values).view(len(values), 1, 1, -1)


def test_the_frechet_distance_of_one_feature_by_hand():
    # real {0, 2}: mean 1, variance 2; fake {1, 5}: mean 3, variance 8 (unbiased, as torchmetrics)
    # FD = (1 - 3)^2 + 2 + 8 - 2 sqrt(2 * 8) = 6
    features = ClassifierFeatures(Readout(1))
    assert frechet_distance(images([[0.0], [2.0]]), images([[1.0], [5.0]]), features) == pytest.approx(6.0, abs=1e-4)
    same = images([[0.0], [1.0], [3.0]])
    assert frechet_distance(same, same, features) == pytest.approx(0.0, abs=1e-4)


def test_the_feature_extractor_stays_frozen_in_eval_mode():
    classifier = Readout(2)
    features = ClassifierFeatures(classifier).train()
    assert not features.backbone.training and not any(p.requires_grad for p in features.parameters())
    assert features.num_features == 2
    # batch norm in eval mode uses its running statistics (0 mean, unit variance): the identity here
    x = images([[3.0, -1.0, 9.0]])
    torch.testing.assert_close(features(x), torch.tensor([[3.0, -1.0]]), atol=1e-4, rtol=1e-4)


def test_the_accuracy_on_conditional_samples():
    # logits are the first three pixels: predictions 0, 2, 1, 2
    samples = images([[5.0, 0.0, 0.0], [0.0, 1.0, 2.0], [0.0, 3.0, 1.0], [0.0, 0.0, 1.0]])
    assert conditional_accuracy(samples, torch.tensor([0, 2, 1, 0]), Readout(3)) == pytest.approx(0.75)


def test_the_nearest_training_image_distance():
    training = images([[0.0, 0.0], [10.0, 10.0]])
    samples = images([[3.0, 4.0], [10.0, 10.0], [7.0, 6.0]])
    torch.testing.assert_close(nearest_training_distance(samples, training), torch.tensor([5.0, 0.0, 5.0]))


def test_sample_quality_reports_every_measure_beside_its_reference():
    torch.manual_seed(0)
    training, reference = torch.rand(20, 1, 1, 4), torch.rand(12, 1, 1, 4)
    copies = training[:12]                     # a model that memorized its training set
    labels = torch.arange(12) % 3
    result = sample_quality(copies, labels, Readout(3), training, reference, labels)
    assert result["nearest_train_distance"] == 0.0 < result["reference_nearest_train_distance"]
    assert "not Inception" in result["feature_extractor"]
    assert {"fd_classifier_features", "conditional_accuracy", "reference_accuracy"} <= set(result)
    assert result["reference_fd_classifier_features"] == pytest.approx(
        frechet_distance(reference, training, ClassifierFeatures(Readout(3))))
    assert "conditional_accuracy" not in sample_quality(copies, None, Readout(3), training, reference)


def test_the_sample_quality_protocol_fits_samples_and_measures(one_thread, tmp_path, monkeypatch):
    from pathlib import Path

    import reglab.generative.measures as measures
    from reglab.generative.protocols import SampleQualityProtocol
    from reglab.tasks import ClassificationModule

    repo = Path(__file__).resolve().parents[1]
    classifier = ClassificationModule(backbone="cnn", num_classes=10, input_shape=(1, 8, 8))
    monkeypatch.setattr(measures, "digits_classifier", lambda config, cache_dir: classifier)
    fast = ["--trainer.max_steps=2", "--trainer.limit_val_batches=1", "--trainer.limit_test_batches=1"]
    protocol = SampleQualityProtocol("smoke", {"configs": [str(repo / "configs/experiment/digits_diffusion.yaml")],
                                               "overrides": fast, "per_class": 2, "sample": {"steps": 2},
                                               "classifier_config": str(repo / "configs/experiment/clean_digits.yaml")})
    result = protocol.run_arm("conditional", {}, 0, tmp_path)
    assert {"test/loss", "fd_classifier_features", "conditional_accuracy", "nearest_train_distance"} <= set(result)
    assert 0.0 <= result["conditional_accuracy"] <= 1.0 and result["nearest_train_distance"] > 0
    with pytest.raises(ClaimError, match="sample setting"):
        SampleQualityProtocol("bad", {"sample": {"eta": 0.0}})
