"""Tabular NCD: the class-count estimate, NCD k-means' seeding, the spectral graph's width, the
hidden-class folds and PBN's loss against hand-computed cases; the technique's and protocol's checks."""

from __future__ import annotations

import doctest
import math

import numpy as np
import pytest
import torch

from reglab.bench.protocols import ClaimError
from reglab.callbacks.category_discovery import tabular_ncd
from reglab.callbacks.category_discovery.tabular_ncd import (
    TabularNCD, add_heads, mirrored_decoder, projection_loss, restore_heads)
from reglab.datamodules import DiscoveryDataModule
from reglab.discovery import tabular
from reglab.discovery.tabular import (
    discovery_scores, estimate_class_count, hidden_class_folds, mst_rbf_width, ncd_kmeans, ncd_kmeans_seeds, ncd_spectral_clustering,
    select_on_hidden_classes)
from reglab.discovery.tabular_protocol import TabularNCDProtocol
from reglab.tasks import ClassificationModule, DiscoveryModule
from reglab.technique import TechniqueConfigError


def test_silhouette_estimate_by_hand():
    points = np.array([[0.0], [0.2], [9.0], [9.2]])
    k, scores = estimate_class_count(points, k_min=2, k_max=3)
    # two clusters: every point's own-cluster distance a = 0.2, the other cluster's mean distance b = 9.1 or 8.9
    expected = 1 - (0.2 / 9.1 + 0.2 / 8.9) / 2
    assert k == 2 and scores[2] == pytest.approx(expected)
    with pytest.raises(ValueError, match="k_min"):
        estimate_class_count(points, k_min=4, k_max=9)  # 4 samples allow 3 clusters at most


class RecordingGenerator:
    """Draws the most probable row and records the probabilities it was given."""

    def __init__(self):
        self.probabilities = []

    def choice(self, n, p):
        self.probabilities.append(p)
        return int(np.argmax(p))

    def integers(self, n):
        raise AssertionError("a uniform draw where a distance-weighted one was due")


def test_ncd_seeding_weights_rows_by_squared_distance_to_the_known_centroids():
    rows = np.array([[0.0], [3.0], [4.0]])
    generator = RecordingGenerator()
    seeds = ncd_kmeans_seeds(rows, np.array([[0.0]]), 2, generator)
    # first seed: squared distances 0, 9, 16 to the known centroid -> 0, 9/25, 16/25
    np.testing.assert_allclose(generator.probabilities[0], [0.0, 9 / 25, 16 / 25])
    # second: the nearest taken seed of each row among {0 (known), 4 (new)}: 0, 1, 0 -> all on row 3
    np.testing.assert_allclose(generator.probabilities[1], [0.0, 1.0, 0.0])
    assert seeds.tolist() == [[4.0], [3.0]]


def test_ncd_kmeans_finds_the_novel_groups_and_never_centres_on_known_rows():
    rows = np.array([[0.0], [0.1], [0.2], [5.0], [5.1], [5.2]])
    for seed in range(3):  # the seeding avoids the row at the known centroid 0.1 as a start
        fitted = ncd_kmeans(rows, np.array([[0.1]]), 2, n_init=3, seed=seed)
        assert sorted(fitted.cluster_centers_.ravel().round(3).tolist()) == [0.1, 5.1]
    assert sorted(ncd_kmeans(rows, None, 2, seed=0).cluster_centers_.ravel().round(3).tolist()) == [0.1, 5.1]


def test_spanning_tree_width_by_hand():
    points = np.array([[0.0], [1.0], [3.0]])  # tree edges 1 and 2: the longest is 2
    sigma = mst_rbf_width(points, 0.5)
    assert sigma == pytest.approx(math.sqrt(2 / math.log(2)))  # exp(-4 / (2 sigma^2)) = 1/2
    assert math.exp(-4 / (2 * sigma**2)) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="min_dist"):
        mst_rbf_width(points, 1.0)


def test_ncd_spectral_clustering_separates_novel_groups_beside_a_known_one():
    rng = np.random.default_rng(0)
    novel = np.concatenate([rng.normal(0, 0.1, (6, 2)), rng.normal([4, 0], 0.1, (6, 2))])
    known = rng.normal([0, 4], 0.1, (6, 2))
    labels = ncd_spectral_clustering(novel, known, np.zeros(6), 2, seed=0)
    assert len(set(labels[:6])) == 1 and len(set(labels[6:])) == 1 and labels[0] != labels[6]
    plain = ncd_spectral_clustering(novel, None, None, 2, seed=0)  # without known rows: plain spectral
    assert len(set(plain[:6])) == 1 and plain[0] != plain[6]


def test_hidden_class_folds_partition_the_known_classes():
    folds = hidden_class_folds([3, 5, 7, 9], 2, seed=1)
    hidden = [set(h) for _, h in folds]
    assert hidden[0].isdisjoint(hidden[1]) and hidden[0] | hidden[1] == {3, 5, 7, 9}
    assert all(set(kept) == {3, 5, 7, 9} - set(h) and len(h) == 2 for kept, h in folds)
    with pytest.raises(ValueError, match="folds of two"):
        hidden_class_folds([0, 1, 2], 2)


def test_selection_averages_over_folds_and_keeps_the_first_best():
    folds = [([0], [1, 2]), ([1, 2], [0])]
    calls = []

    def score(candidate, kept, hidden):
        calls.append((candidate["w"], tuple(hidden)))
        return candidate["w"] * len(hidden) if candidate["w"] < 0.9 else 0.45  # means 0.3, 0.75, 0.45

    best, table = select_on_hidden_classes({"w": [0.2, 0.5, 0.9]}, folds, score)
    assert [round(mean, 3) for _, mean in table] == [0.3, 0.75, 0.45] and best == {"w": 0.5}
    assert len(calls) == 6  # every candidate on every fold
    tie, _ = select_on_hidden_classes({"w": [0.2, 0.3]}, folds, lambda c, k, h: 1.0)
    assert tie == {"w": 0.2}
    with pytest.raises(ValueError, match="no candidate"):
        select_on_hidden_classes({"w": []}, folds, score)


def test_scores_read_only_the_scored_rows_labels():
    rows = np.array([[0.0], [0.1], [5.0], [5.1], [9.0], [9.1]])
    scored = np.array([True, True, True, True, False, False])
    # 3 clusters; the scored rows (classes 0 and 1) are clustered right; the last two rows' labels vary
    for unscored in ([2, 2], [0, 1]):
        scores = discovery_scores(rows, rows[:0], np.empty(0), np.array([0, 0, 1, 1, *unscored]), 3, "kmeans", False,
                                  scored)
        assert scores == {"pool_acc_new": 1.0, "num_novel": 3.0, "num_novel_error": 0.0}
    # scoring every row: the third cluster's rows (classes 0 and 1, both matched to the first two clusters
    # already) count as wrong: 4 of 6
    assert discovery_scores(rows, rows[:0], np.empty(0), np.array([0, 0, 1, 1, 0, 1]), 3, "kmeans",
                            False)["pool_acc_new"] == pytest.approx(4 / 6)


def test_tuning_hides_known_classes_beside_the_novel_ones_and_scores_them_alone(monkeypatch):
    protocol = TabularNCDProtocol("t", {"data": {"source": "blobs", "generated_classes": 8, "known_classes": [0, 1, 2, 3]},
                                        "folds": 2})
    calls = []

    def fit(spec, arguments, seed, classes=None):
        calls.append((arguments, classes))
        return {"pool_acc_new": arguments["w"] if classes else 0.5, "num_novel": 4.0, "num_novel_error": 0.0}

    monkeypatch.setattr(protocol, "fit", fit)
    spec = {"technique": {"class_path": "reglab.callbacks.category_discovery.TabularNCD"}, "tune": {"w": [0.2, 0.8]}}
    result = protocol.run_arm("a", spec, seed=0, workdir=None)
    folds = [classes for _, classes in calls if classes]
    assert len(folds) == 4 and result["tuned_w"] == 0.8 and calls[-1] == ({"w": 0.8}, None)
    for classes in folds:
        hidden = [c for c in classes["novel_classes"] if c < 4]
        assert classes["novel_classes"] == hidden + [4, 5, 6, 7]  # hidden first, then the real novel classes
        assert sorted(classes["known_classes"] + hidden) == [0, 1, 2, 3]
    assert all(arguments["scored_classes"] == [0, 1] for arguments, classes in calls if classes)


def test_projection_loss_by_hand():
    logits = torch.tensor([[math.log(3), 0.0], [0.0, 0.0], [0.0, 0.0]])  # row 0: p(class 0) = 3/4
    target, labelled = torch.tensor([0, -1, -1]), torch.tensor([True, False, False])
    reconstruction, inputs = torch.tensor([[1.0, 1.0], [0.0, 2.0], [0.0, 0.0]]), torch.zeros(3, 2)
    ce, mse = -math.log(0.75), (2 + 4 + 0) / 3  # labelled rows' mean CE; squared error summed per row, averaged
    for w in (0.0, 0.3, 1.0):
        rows = projection_loss(logits, target, labelled, reconstruction, inputs, w)
        assert float(rows.mean()) == pytest.approx(w * ce + (1 - w) * mse)


def test_decoder_mirrors_the_encoder():
    module = DiscoveryModule("mlp", input_shape=(10,), num_classes=4, num_known_classes=2,
                             backbone_kwargs={"hidden_sizes": [8, 6, 4]})
    decoder = mirrored_decoder(module.backbone, 3, 10)  # from a 3-d latent on the backbone's 4-d features
    widths = [(m.in_features, m.out_features) for m in decoder if isinstance(m, torch.nn.Linear)]
    assert widths == [(3, 4), (4, 6), (6, 8), (8, 10)]


def test_a_bare_module_gets_the_checkpoint_s_heads_back():
    def module():
        return DiscoveryModule("mlp", input_shape=(10,), num_classes=4, num_known_classes=2)

    trained = module()
    add_heads(trained, latent_dim=5)
    checkpoint = {"state_dict": trained.state_dict()}
    bare = module()
    restore_heads(bare, checkpoint)
    bare.load_state_dict(checkpoint["state_dict"])  # strict: every key has its place, shapes included
    assert bare.tabular_ncd_pbn["latent"].out_features == 5 and bare.tabular_ncd_pbn["classifier"].out_features == 2


class _Trainer:
    def __init__(self, datamodule):
        self.datamodule = datamodule


def test_technique_refuses_bad_arguments_gcd_pools_and_other_modules():
    for kwargs, match in (({"w": 1.5}, "w 1.5"), ({"latent_dim": 0}, "latent_dim"), ({"clustering": "dbscan"}, "clustering"),
                          ({"k_min": 1}, "range"), ({"min_dist": 0.0}, "min_dist")):
        with pytest.raises(TechniqueConfigError, match=match):
            TabularNCD(**kwargs)
    module = DiscoveryModule("mlp", input_shape=(8,), num_classes=6, num_known_classes=3)
    with pytest.raises(TechniqueConfigError, match="mode 'gcd'"):
        TabularNCD().setup(_Trainer(DiscoveryDataModule("blobs", known_classes=[0, 1, 2])), module, "fit")
    with pytest.raises(TechniqueConfigError, match="DiscoveryModule"):
        TabularNCD().setup(_Trainer(None), ClassificationModule("mlp", num_classes=3, input_shape=(4,)), "fit")


def test_training_views_are_the_rows_themselves():
    batch = {"input": torch.ones(2, 3), "view1": torch.zeros(2, 3), "view2": torch.zeros(2, 3)}
    out = TabularNCD().transform_batch(batch, None)
    assert torch.equal(out["view1"], batch["input"]) and torch.equal(out["view2"], batch["input"])
    assert TabularNCD().transform_batch({"input": torch.ones(2, 3)}, None).keys() == {"input"}


def test_protocol_refuses_unknown_fields_and_untunable_splits():
    protocol = TabularNCDProtocol("t", {"data": {"source": "blobs", "known_classes": [0, 1, 2]}, "epochs": 1})
    technique = {"class_path": "reglab.callbacks.category_discovery.TabularNCD"}
    with pytest.raises(ClaimError, match="unknown field"):
        protocol.check_arm("a", {"features": "raw", "epochs": 3})
    with pytest.raises(ClaimError, match="folds of two"):  # 3 known classes: no 2 folds of two classes
        protocol.check_arm("a", {"technique": technique, "tune": {"w": [0.5]}})
    with pytest.raises(ClaimError, match="mode ncd"):
        TabularNCDProtocol("t", {"data": {"source": "blobs", "mode": "gcd"}})


@pytest.mark.parametrize("module", [tabular, tabular_ncd])
def test_docstring_examples_run(module):
    result = doctest.testmod(module, verbose=False)
    assert result.attempted >= 3 and result.failed == 0, result
