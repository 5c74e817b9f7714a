"""Forests as smoothers (paper 43): smoothing weights and effective parameters against hand-computed
cases and against scikit-learn's own predictions; the command's files and refusals."""

from __future__ import annotations

import doctest

import numpy as np
import pytest
from sklearn.ensemble import RandomForestClassifier, RandomForestRegressor

import reglab.analysis.smoothers
from reglab.analysis.smoothers import (
    SmootherError,
    SmoothersProtocol,
    effective_parameters,
    forest_smoothing_weights,
    load_smoother_data,
    main,
    measure_smoothing,
    tree_smoothing_weights,
)
from reglab.bench.protocols import ClaimError
from reglab.cli import main as reglab_main


def test_tree_weights_are_bootstrap_counts_in_the_leaf_normalized():
    # training points 0, 1 in leaf 7 (drawn 2 and 1 times), 2 in leaf 8 (once), 3 in leaf 8 (not drawn)
    weights = tree_smoothing_weights(np.array([7, 7, 8, 8]), np.array([7, 8, 8]), np.array([2, 1, 1, 0]))
    np.testing.assert_allclose(weights, [[2 / 3, 1 / 3, 0, 0], [0, 0, 1, 0], [0, 0, 1, 0]])
    # without bootstrap, a leaf's members share its weight equally
    np.testing.assert_allclose(tree_smoothing_weights(np.array([0, 0, 1]), np.array([0])), [[0.5, 0.5, 0.0]])
    with pytest.raises(SmootherError, match="no drawn training point"):
        tree_smoothing_weights(np.array([7, 8]), np.array([8]), np.array([1, 0]))


def test_effective_parameters_hand_cases():
    # k nearest neighbours (weights 1/k on k points): p = n / k
    n, k = 12, 3
    knn = np.zeros((5, n))
    for row in range(5):
        knn[row, row:row + k] = 1 / k
    assert effective_parameters(knn) == pytest.approx(n / k)
    # the forest average of two trees at one input: tree A (1/2, 1/2, 0, 0), tree B (1, 0, 0, 0) ->
    # forest (3/4, 1/4, 0, 0): ||.||^2 = 10/16, p = 4 * 10/16 = 2.5; the trees' mean p = 4 * (1/2 + 1)/2 = 3
    tree_a = tree_smoothing_weights(np.array([0, 0, 1, 1]), np.array([0]))
    tree_b = tree_smoothing_weights(np.array([0, 1, 1, 1]), np.array([0]))
    assert effective_parameters((tree_a + tree_b) / 2) == pytest.approx(2.5)
    assert np.mean([effective_parameters(tree_a), effective_parameters(tree_b)]) == pytest.approx(3.0)


def test_an_unbootstrapped_tree_has_as_many_parameters_as_leaves_at_its_training_inputs():
    data = load_smoother_data("mars_additive", seed=1, n_train=80, n_test=10)
    forest = RandomForestRegressor(n_estimators=1, bootstrap=False, max_leaf_nodes=6, random_state=0)
    forest.fit(data.x_train, data.y_train)
    weights = forest_smoothing_weights(forest, data.x_train, data.x_train)
    assert forest.estimators_[0].get_n_leaves() == 6
    assert weights.tree_parameters == pytest.approx(6.0) and weights.forest_parameters == pytest.approx(6.0)


def test_weights_reproduce_scikit_learn_predictions_and_the_forest_averages_its_trees():
    data = load_smoother_data("diabetes", seed=0, n_train=120, n_test=30)
    forest = RandomForestRegressor(n_estimators=7, max_features=0.5, random_state=3).fit(data.x_train, data.y_train)
    weights = forest_smoothing_weights(forest, data.x_train, data.x_test)
    np.testing.assert_allclose(weights.forest.sum(axis=1), 1.0)
    np.testing.assert_allclose(weights.forest @ data.y_train, forest.predict(data.x_test), rtol=1e-10)
    np.testing.assert_allclose(weights.first_tree @ data.y_train, forest.estimators_[0].predict(data.x_test), rtol=1e-10)
    # identical trees (no bootstrap, every feature tried, large leaves so that no two splits tie): the
    # forest is exactly as smooth as its trees
    mars = load_smoother_data("mars_additive", seed=0, n_train=120, n_test=30)
    same = RandomForestRegressor(n_estimators=3, bootstrap=False, max_features=None, max_leaf_nodes=8,
                                 random_state=0)
    same.fit(mars.x_train, mars.y_train)
    identical = forest_smoothing_weights(same, mars.x_train, mars.x_test)
    assert identical.forest_parameters == pytest.approx(identical.tree_parameters)


def test_measure_smoothing_metrics_and_the_claims_direction():
    data = load_smoother_data("mars_additive", seed=0, n_train=100, n_test=50)
    metrics = measure_smoothing(data, seed=0, offsets=[0.0, 1.0], forest_args={"n_estimators": 10})
    assert {"train/forest_parameters", "offset_1/tree_parameters", "test/forest_over_trees", "away_over_near"} <= set(metrics)
    assert metrics["away_over_near"] == pytest.approx(metrics["test/forest_over_trees"] / metrics["train/forest_over_trees"])
    assert metrics["test/forest_over_trees"] < 1.0 and metrics["away_over_near"] < 1.0
    with pytest.raises(SmootherError, match="include 0"):
        measure_smoothing(data, seed=0, offsets=[1.0])


def test_bad_data_and_claim_settings_are_refused_early():
    with pytest.raises(SmootherError, match="unknown data set 'boston'"):
        load_smoother_data("boston", seed=0)
    with pytest.raises(SmootherError, match="dim >= 5"):
        load_smoother_data("mars_additive", seed=0, dim=3)
    data = load_smoother_data("breast_cancer", seed=0, n_train=40, n_test=5)
    classifier = RandomForestClassifier(n_estimators=2, random_state=0).fit(data.x_train, data.y_train > 0)
    with pytest.raises(SmootherError, match="not a fitted scikit-learn regression forest"):
        forest_smoothing_weights(classifier, data.x_train, data.x_test)
    with pytest.raises(SmootherError, match="not a fitted"):
        forest_smoothing_weights(RandomForestRegressor(), data.x_train, data.x_test)
    with pytest.raises(ClaimError, match="RandomForestRegressor's arguments"):
        SmoothersProtocol("c", {"forest": {"trees": 3}})
    with pytest.raises(ClaimError, match="an arm is `data"):
        SmoothersProtocol("c", {}).check_arm("a", {"data": "boston"})


def test_command_writes_the_figure_and_numbers_and_never_overwrites(tmp_path, capsys):
    argv = ["--out", str(tmp_path), "--data", "mars_additive", "--n_train", "40", "--n_test", "20",
            "--n_estimators", "3", "--offsets", "0", "1"]
    reglab_main(["smoothers", *argv])  # through the `reglab` command table
    assert (tmp_path / "smoothers.png").stat().st_size > 0 and "mars_additive" in (tmp_path / "smoothers.json").read_text()
    assert "at held-out inputs" in capsys.readouterr().out
    before = (tmp_path / "smoothers.json").read_text()
    with pytest.raises(SystemExit, match="never overwritten"):
        main(argv)
    assert (tmp_path / "smoothers.json").read_text() == before


def test_docstring_examples_run():
    assert doctest.testmod(reglab.analysis.smoothers, verbose=False).failed == 0
