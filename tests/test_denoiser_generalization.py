"""The maths of the denoiser-generalization analysis (paper 61) on hand-computed cases; the end-to-end
run is the claim's smoke test (tests/test_claims.py)."""

import math

import pytest
import torch

from reglab.bench.protocols import ClaimError
from reglab.generative.generalization import (DenoiserGeneralizationProtocol, crossover_size, disjoint_subsets,
                                              gain, image_correlation)


def test_correlation_of_hand_computed_pairs():
    a, b = torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[2.0, 4.0, 7.0]])
    # centred: (-1, 0, 1) . (-7/3, -1/3, 8/3) = 5; norms sqrt(2) and sqrt(38/3)
    expected = 5 / (math.sqrt(2) * math.sqrt(38 / 3))
    assert image_correlation(a, b).item() == pytest.approx(expected, abs=1e-6)
    x = torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    assert image_correlation(x, torch.tensor([[1.0, 1.0, -1.0, -1.0]])).item() == pytest.approx(0.0, abs=1e-7)
    assert image_correlation(x, -x).item() == pytest.approx(-1.0)


def test_correlation_ignores_brightness_and_contrast_of_images():
    images = torch.rand(3, 1, 4, 4)
    assert image_correlation(images, 0.5 * images + 0.2).tolist() == pytest.approx([1.0] * 3)


def test_gain_is_last_minus_first():
    assert gain([0.25, 0.1, 0.75]) == pytest.approx(0.5)


def test_crossover_interpolates_in_log_size():
    # the ratio reaches 1 halfway (0.6 -> 1.4) between 32 and 128: halfway in log2 N is 64
    assert crossover_size([8, 32, 128], [0.2, 0.6, 1.4], level=1.0) == pytest.approx(64.0)
    assert crossover_size([8, 32, 128], [0.2, 1.0, 1.4], level=1.0) == pytest.approx(32.0)
    assert crossover_size([8, 32], [0.5, 0.7], level=0.4) == 8.0
    assert math.isnan(crossover_size([8, 32], [0.5, 0.7], level=0.9))


def test_subsets_are_disjoint_nested_and_of_size_n():
    subsets = disjoint_subsets(20, [2, 6], seed=3)
    for n, (a, b) in subsets.items():
        assert len(a) == len(b) == n and not set(a.tolist()) & set(b.tolist())
    assert set(subsets[2][0].tolist()) <= set(subsets[6][0].tolist())
    assert set(subsets[2][1].tolist()) <= set(subsets[6][1].tolist())
    with pytest.raises(ValueError, match="at most 10"):
        disjoint_subsets(20, [11], seed=0)


def test_protocol_refuses_bad_settings_and_arms_at_load():
    with pytest.raises(ClaimError, match="training split"):
        DenoiserGeneralizationProtocol("c", {"sizes": [8, 10_000]})
    with pytest.raises(ClaimError, match="timesteps"):
        DenoiserGeneralizationProtocol("c", {"noise_timesteps": [1000]})
    with pytest.raises(ClaimError, match="only a label"):
        DenoiserGeneralizationProtocol("c", {}).check_arm("a", {"configs": ["x.yaml"]})
