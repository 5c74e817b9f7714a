"""Hand-computed checks of reglab.metrics."""

from __future__ import annotations

import doctest

import pytest
import torch

import reglab.metrics.classification
import reglab.metrics.noisy_labels
from reglab.metrics import (
    NoisyLabelMemorization,
    classification_metrics,
    per_class_accuracy_dict,
)

# Six samples, the last three mislabelled. Sample 3 is predicted as its noisy label (memorized),
# sample 4 as its clean label (corrected), sample 5 as a third class (neither). The clean samples'
# predictions are a mix of right and wrong: they must not affect the result.
NOISY_TARGET = torch.tensor([0, 1, 2, 0, 1, 2])
CLEAN_TARGET = torch.tensor([0, 1, 2, 1, 2, 0])
PREDICTED_CLASS = torch.tensor([1, 1, 0, 0, 2, 1])


def shares(metric: NoisyLabelMemorization) -> dict[str, float]:
    return {name: value.item() for name, value in metric.compute().items()}


def one_hot_logits(classes: torch.Tensor, num_classes: int = 3) -> torch.Tensor:
    return torch.nn.functional.one_hot(classes, num_classes).float() * 5.0


@pytest.mark.parametrize(
    "preds", [PREDICTED_CLASS, one_hot_logits(PREDICTED_CLASS)], ids=["indices", "logits"]
)
def test_memorization_counts_only_noisy_samples(preds):
    metric = NoisyLabelMemorization()
    metric.update(preds, NOISY_TARGET, CLEAN_TARGET)
    assert shares(metric) == pytest.approx(
        {"memorized": 1 / 3, "corrected": 1 / 3, "noisy_samples": 3}
    )


def test_memorization_returns_float_shares_and_integer_count():
    metric = NoisyLabelMemorization()
    metric.update(PREDICTED_CLASS, NOISY_TARGET, CLEAN_TARGET)
    result = metric.compute()
    assert result["memorized"].is_floating_point()
    assert result["corrected"].is_floating_point()
    assert not result["noisy_samples"].is_floating_point()


def test_memorization_is_zero_without_noisy_samples():
    metric = NoisyLabelMemorization()
    metric.update(PREDICTED_CLASS, CLEAN_TARGET, CLEAN_TARGET)
    assert shares(metric) == {"memorized": 0.0, "corrected": 0.0, "noisy_samples": 0}


def test_memorization_accumulates_over_updates():
    metric = NoisyLabelMemorization()
    metric.update(PREDICTED_CLASS[:4], NOISY_TARGET[:4], CLEAN_TARGET[:4])
    metric.update(PREDICTED_CLASS[4:], NOISY_TARGET[4:], CLEAN_TARGET[4:])
    # Second epoch-like pass where every noisy sample is memorized: 1 + 3 of 6.
    metric.update(NOISY_TARGET, NOISY_TARGET, CLEAN_TARGET)
    assert shares(metric) == pytest.approx(
        {"memorized": 4 / 6, "corrected": 1 / 6, "noisy_samples": 6}
    )


def test_memorization_reset_clears_counts():
    metric = NoisyLabelMemorization()
    metric.update(PREDICTED_CLASS, NOISY_TARGET, CLEAN_TARGET)
    metric.reset()
    metric.update(CLEAN_TARGET, NOISY_TARGET, CLEAN_TARGET)
    assert shares(metric) == {"memorized": 0.0, "corrected": 1.0, "noisy_samples": 3}


def test_memorization_merges_like_ddp_processes():
    # merge_state applies each state's dist_reduce_fx, the same reduction DDP sync performs;
    # spawning real processes would cost an extra torchmetrics import per rank.
    first_rank, second_rank, single_process = (NoisyLabelMemorization() for _ in range(3))
    first_rank.update(PREDICTED_CLASS[:4], NOISY_TARGET[:4], CLEAN_TARGET[:4])
    second_rank.update(PREDICTED_CLASS[4:], NOISY_TARGET[4:], CLEAN_TARGET[4:])
    single_process.update(PREDICTED_CLASS, NOISY_TARGET, CLEAN_TARGET)
    first_rank.merge_state(second_rank)
    assert shares(first_rank) == shares(single_process)


@pytest.mark.parametrize(
    "preds",
    [torch.tensor([0.2, 0.9, 0.4, 0.1, 0.8, 0.3]), torch.zeros(6, 3, 1)],
    ids=["1d-float", "3d"],
)
def test_memorization_rejects_ambiguous_predictions(preds):
    with pytest.raises(ValueError, match="preds must be"):
        NoisyLabelMemorization().update(preds, NOISY_TARGET, CLEAN_TARGET)


def test_memorization_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="same N samples"):
        NoisyLabelMemorization().update(PREDICTED_CLASS[:5], NOISY_TARGET, CLEAN_TARGET)


def test_memorization_declares_state_reduction():
    metric = NoisyLabelMemorization()
    assert metric.full_state_update is False
    assert metric.higher_is_better is None
    assert set(metric._reductions) == {"noisy_samples", "memorized", "corrected"}


def test_classification_accuracy_overall_and_per_class():
    metrics = classification_metrics(num_classes=3, prefix="val/")
    target = torch.tensor([0, 0, 1, 1, 2, 2])
    predicted_class = torch.tensor([0, 0, 1, 0, 1, 1])
    metrics.update(one_hot_logits(predicted_class), target)
    results = metrics.compute()
    assert set(results) == {"val/acc", "val/acc_per_class", "val/ece"}
    assert results["val/acc"].item() == pytest.approx(3 / 6)
    per_class = per_class_accuracy_dict(results["val/acc_per_class"], prefix="val/")
    assert {name: value.item() for name, value in per_class.items()} == pytest.approx(
        {"val/acc_class_0": 1.0, "val/acc_class_1": 0.5, "val/acc_class_2": 0.0}
    )


def test_classification_metrics_accumulate_and_reset():
    metrics = classification_metrics(num_classes=2, prefix="")
    metrics.update(torch.tensor([[1.0, 0.0]]), torch.tensor([0]))
    metrics.update(torch.tensor([[1.0, 0.0]]), torch.tensor([1]))
    assert metrics.compute()["acc"].item() == pytest.approx(0.5)
    metrics.reset()
    metrics.update(torch.tensor([[0.0, 1.0]]), torch.tensor([1]))
    assert metrics.compute()["acc"].item() == pytest.approx(1.0)


def test_calibration_error_is_zero_for_confident_correct_predictions():
    metrics = classification_metrics(num_classes=3, prefix="")
    target = torch.tensor([0, 1, 2, 2])
    probabilities = torch.nn.functional.one_hot(target, 3).float()
    metrics.update(probabilities, target)
    assert metrics.compute()["ece"].item() == pytest.approx(0.0, abs=1e-6)


def test_calibration_error_matches_hand_value():
    # Bin around 0.9: two samples, one correct -> |0.9 - 0.5| = 0.4, weight 2/6.
    # Bin around 0.6: four samples, three correct -> |0.6 - 0.75| = 0.15, weight 4/6.
    probabilities = torch.tensor([[0.9, 0.05, 0.05]] * 2 + [[0.6, 0.2, 0.2]] * 4)
    target = torch.tensor([0, 1, 0, 0, 0, 2])
    metrics = classification_metrics(num_classes=3, prefix="")
    metrics.update(probabilities, target)
    assert metrics.compute()["ece"].item() == pytest.approx(2 / 6 * 0.4 + 4 / 6 * 0.15, abs=1e-5)


@pytest.mark.parametrize(
    "module",
    [reglab.metrics.noisy_labels, reglab.metrics.classification],
    ids=lambda module: module.__name__,
)
def test_docstring_examples_run(module):
    failures, attempted = doctest.testmod(module)
    assert attempted > 0
    assert failures == 0
