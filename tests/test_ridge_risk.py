"""More is better (paper 67): the ridge solutions against scikit-learn and hand cases, the nested
features, the tuned risk, the monotonicity metric; the command's files and refusals."""

from __future__ import annotations

import doctest

import numpy as np
import pytest
from sklearn.linear_model import Ridge

import reglab.analysis.ridge_risk
from reglab.analysis.ridge_risk import (
    RandomFeatureTask,
    RidgeRiskError,
    RidgeRiskProtocol,
    largest_rise,
    main,
    powerlaw_task,
    ridge_predictions,
    risk_curves,
)
from reglab.bench.protocols import ClaimError
from reglab.cli import main as reglab_main


@pytest.mark.parametrize("shape", [(30, 8), (8, 30)])  # under- and overparameterized
def test_ridge_grid_matches_scikit_learn_and_the_min_norm_solution(shape):
    rng = np.random.default_rng(0)
    features, targets, held_out = rng.normal(size=shape), rng.normal(size=shape[0]), rng.normal(size=(5, shape[1]))
    ridges = [0.0, 1e-3, 0.5, 20.0]
    predictions = ridge_predictions(features, targets, held_out, ridges)
    for row, ridge in zip(predictions[1:], ridges[1:]):
        reference = Ridge(alpha=ridge, fit_intercept=False, solver="svd").fit(features, targets).predict(held_out)
        np.testing.assert_allclose(row, reference, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(predictions[0], held_out @ np.linalg.pinv(features) @ targets, rtol=1e-8, atol=1e-10)


def test_powerlaw_task_hand_values():
    eigenvalues, coefficients = powerlaw_task(3, alpha=1.0, beta=2.0)
    np.testing.assert_allclose(eigenvalues, [1, 1 / 2, 1 / 3])
    np.testing.assert_allclose(coefficients, np.array([1, 1 / 2, 1 / 3]) / np.sqrt(1 + 1 / 4 + 1 / 9))


def test_widths_share_features_and_rescale_to_one_kernel():
    task = RandomFeatureTask(seed=0, dim=16, n_train=10, n_val=5, n_test=5)
    narrow, full = task.features("train", 4), task.features("train", 16)
    np.testing.assert_allclose(narrow / np.sqrt(16 / 4), full[:, :4])
    np.testing.assert_allclose(task.features("train", 16, samples=3), full[:3])
    with pytest.raises(RidgeRiskError, match="outside 1 … 16"):
        task.features("train", 17)


def test_the_oracle_ridge_is_never_worse_than_the_validated_or_a_fixed_one():
    task = RandomFeatureTask(seed=1, dim=64, n_train=40, n_val=100, n_test=100)
    ridges = [0.0, 1e-3, 1e-1, 10.0]
    oracle = task.test_risk(32, 40, "oracle", ridges, fixed_ridge=0.0)
    assert oracle <= task.test_risk(32, 40, "validation", ridges, fixed_ridge=0.0)
    assert all(oracle <= task.test_risk(32, 40, "fixed", ridges, fixed_ridge=r) for r in ridges)
    # the interpolation threshold k = n without a ridge is worse than the tuned one (double descent)
    assert task.test_risk(40, 40, "fixed", ridges, fixed_ridge=0.0) > task.test_risk(40, 40, "oracle", ridges, 0.0)


def test_largest_rise_hand_values():
    assert largest_rise([4.0, 2.0, 1.0]) == pytest.approx(-0.5)
    assert largest_rise([1.0, 1.5, 0.5]) == pytest.approx(0.5)


def test_bad_settings_are_refused_early():
    with pytest.raises(RidgeRiskError, match="tuning 'best'"):
        risk_curves(0, tuning="best")
    with pytest.raises(RidgeRiskError, match="increasing order"):
        risk_curves(0, widths=[16, 8], dim=32)
    with pytest.raises(ClaimError, match="raise `dim`"):
        RidgeRiskProtocol("c", {"widths": [8, 64], "dim": 32, "fixed_width": 8})
    with pytest.raises(ClaimError, match="an arm is `tuning"):
        RidgeRiskProtocol("c", {}).check_arm("a", {"tuning": "best"})


def test_command_writes_the_figure_and_numbers_and_never_overwrites(tmp_path, capsys):
    argv = ["--out", str(tmp_path), "--widths", "4", "8", "16", "--samples", "4", "8", "16", "--fixed_width", "8",
            "--fixed_samples", "8", "--dim", "32"]
    reglab_main(["ridge-risk", *argv])  # through the `reglab` command table
    assert (tmp_path / "ridge_risk.png").stat().st_size > 0 and '"validation"' in (tmp_path / "ridge_risk.json").read_text()
    assert "largest rise along width" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="never overwritten"):
        main(argv)


def test_docstring_examples_run():
    assert doctest.testmod(reglab.analysis.ridge_risk, verbose=False).failed == 0
