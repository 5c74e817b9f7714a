"""Generation measures (reglab.metrics.generation) against hand-computed token sequences."""

from __future__ import annotations

import math

import pytest
import torch

from reglab.metrics import DistinctN, NgramRepetition, PredictiveEntropy


def test_repetition_is_the_mean_share_of_repeated_ngrams_per_generation():
    metric = NgramRepetition(n=2)
    # bigrams 55 x5: 1 unique of 5 -> 0.8 repeated; 12 23 31 12 23: 3 unique of 5 -> 0.4 repeated
    metric.update(torch.tensor([[5, 5, 5, 5, 5, 5]]))
    metric.update(torch.tensor([[1, 2, 3, 1, 2, 3]]))
    assert metric.compute().item() == pytest.approx((0.8 + 0.4) / 2)
    four = NgramRepetition(n=4)
    four.update(torch.tensor([[1, 2, 3, 4, 1, 2, 3, 4], [1, 2, 3, 4, 5, 6, 7, 8]]))  # 1234 repeats once of 5; none
    assert four.compute().item() == pytest.approx((1 / 5 + 0) / 2)


def test_distinct_n_counts_over_all_generations_together():
    metric = DistinctN(n=2)
    # bigrams 12 21 12 | 21 13 33: distinct {12, 21, 13, 33} = 4 of 6 (a per-generation mean would be 0.83)
    metric.update(torch.tensor([[1, 2, 1, 2]]))
    metric.update(torch.tensor([[2, 1, 3, 3]]))
    assert metric.compute().item() == pytest.approx(4 / 6)
    unigrams = DistinctN(n=1)
    unigrams.update(torch.tensor([[7, 7, 7], [7, 8, 9]]))
    assert unigrams.compute().item() == pytest.approx(3 / 6)


def test_predictive_entropy_is_the_mean_entropy_in_nats():
    metric = PredictiveEntropy()
    uniform = torch.zeros(4)  # log 4
    three_to_one = torch.tensor([math.log(3), 0.0, -math.inf, -math.inf])  # p = (3/4, 1/4, 0, 0)
    metric.update(torch.stack([uniform, three_to_one]).view(1, 2, 4))
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert metric.compute().item() == pytest.approx((math.log(4) + h) / 2, rel=1e-6)
    one_hot = PredictiveEntropy()
    one_hot.update(torch.tensor([[0.0, -math.inf]]))
    assert one_hot.compute().item() == 0.0


def test_bad_input_is_refused_with_the_fix():
    with pytest.raises(ValueError, match="n must be an integer >= 1"):
        NgramRepetition(n=0)
    with pytest.raises(ValueError, match="Fix: generate at least 4 tokens"):
        NgramRepetition(n=4).update(torch.tensor([[1, 2, 3]]))
    with pytest.raises(ValueError, match=r"expected \(N, T\) integer token ids"):
        DistinctN(n=1).update(torch.rand(2, 3))
