"""The clustering side of practical novel class discovery in tabular data (Troisemaine et al., DMKD
2024, "A Practical Approach to Novel Class Discovery in Tabular Data"): pure functions on arrays.

* :func:`estimate_class_count`: the number of novel classes, as the ``k`` in ``k_min..k_max`` whose
  k-means clustering of the novel data (in a model's latent space, or raw) has the highest
  silhouette;
* :func:`ncd_kmeans`: k-means on the novel data whose k-means++ seeding treats the known classes'
  centroids as seeds already taken, so the new centroids start away from the known classes;
* :func:`ncd_spectral_clustering`: a spectral embedding of the known and novel data together (an RBF
  graph whose width :func:`mst_rbf_width` sets from the minimum spanning tree), then NCD k-means on
  the novel rows with the known classes' centroids in the embedding;
* :func:`hidden_class_folds` and :func:`select_on_hidden_classes`: hyperparameter selection without
  novel labels, k-fold over the *known* classes: each fold hides some known classes, which play the
  novel ones, and a candidate is scored by the clustering accuracy on them, averaged over the folds.

Follows the official code (github.com/ColinTr/PracticalNCD: ``models/NCD_Kmeans.py``,
``models/NCD_Spectral_Clustering.py``, ``Full_notebook_with_k_estimation.ipynb``) and, for the
k-fold selection, which the code does not ship (only its results, ``hyperparameters.json``), the
paper's method text. Where this differs from the code, and why:

* k-means is scikit-learn's (Lloyd from the seeds given here); the code has its own loop. Only the
  seeding is written by hand: scikit-learn's k-means++ cannot start from centroids it must not move;
* the code's seeding draws proportionally to the *distance* to the nearest taken seed although its
  docstring says (k-means++) the squared distance; here the squared distance, as documented;
* the code's RBF width makes the longest spanning-tree edge's affinity ``sqrt(min_dist)`` (it solves
  ``exp(-d²/σ²) = min_dist`` but builds ``exp(-d²/(2σ²))``); here that affinity is ``min_dist``, as its
  docstring says (``min_dist`` is tuned anyway: the two only rescale it);
* the spectral embedding is scikit-learn's ``spectral_embedding`` (normalized Laplacian, first
  eigenvector dropped), whose rows are the eigenvectors divided by the square root of the degree
  (the code keeps the eigenvectors themselves);
* the class-count estimate fits one k-means (10 restarts) per ``k`` instead of averaging three, and
  is made on the features given (a model's latent, or the rows) for every clustering: the code's NCD
  spectral clustering estimates it in its spectral embedding.

Example:
    >>> import numpy as np
    >>> points = np.array([[0.0], [0.1], [5.0], [5.1], [10.0], [10.1]])
    >>> estimate_class_count(points, k_min=2, k_max=4)[0]
    3
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, Optional

import numpy as np
import torch
from scipy.sparse.csgraph import minimum_spanning_tree
from scipy.spatial.distance import pdist, squareform
from sklearn.cluster import KMeans
from sklearn.manifold import spectral_embedding
from sklearn.metrics import silhouette_score

from reglab.metrics import ClusteringAccuracy

Clustering = Literal["kmeans", "ncd_kmeans", "ncd_spectral"]
CLUSTERINGS = ("kmeans", "ncd_kmeans", "ncd_spectral")


def estimate_class_count(features: np.ndarray, k_min: int = 2, k_max: int = 30, n_init: int = 10,
                         seed: int = 0) -> tuple[int, dict[int, float]]:
    """``(k, {k: silhouette})``: the ``k`` in ``k_min..k_max`` whose k-means clustering of
    ``features`` has the highest silhouette (the first such ``k`` on ties). ``k_max`` is capped at
    ``len(features) - 1``, where the silhouette stops being defined.

    Example:
        >>> points = np.array([[0.0], [0.2], [9.0], [9.2]])
        >>> estimate_class_count(points, k_min=2, k_max=3)[0]
        2
    """
    k_max = min(k_max, len(features) - 1)
    if k_min < 2 or k_max < k_min:
        raise ValueError(f"estimate_class_count: the range {k_min}..{k_max} is empty or starts below 2 (the "
                         f"silhouette needs two clusters; {len(features)} samples allow at most {len(features) - 1}). "
                         "Fix: k_min ≥ 2 and more samples than k_min.")
    scores = {k: float(silhouette_score(features, KMeans(k, n_init=n_init, random_state=seed).fit_predict(features)))
              for k in range(k_min, k_max + 1)}
    return max(scores, key=scores.__getitem__), scores


def ncd_kmeans_seeds(features: np.ndarray, known_centroids: np.ndarray, k: int,
                     rng: np.random.Generator) -> np.ndarray:
    """``(k, D)`` k-means++ seeds drawn from ``features``, with ``known_centroids`` counted as seeds
    already taken: each new seed is a row drawn with probability proportional to its squared distance
    to the nearest taken seed (known or new), so rows at a known centroid are never drawn. Without
    known centroids the first seed is drawn uniformly (plain k-means++).

    Example:
        >>> rows = np.array([[0.0], [0.0], [4.0]])
        >>> ncd_kmeans_seeds(rows, np.array([[0.0]]), 1, np.random.default_rng(0)).tolist()
        [[4.0]]
    """
    taken = np.asarray(known_centroids, dtype=float).reshape(-1, features.shape[1])
    seeds = []
    for _ in range(k):
        centres = np.concatenate([taken, *seeds]) if seeds else taken
        if len(centres) == 0:
            choice = rng.integers(len(features))
        else:
            nearest = ((features[:, None, :] - centres[None, :, :]) ** 2).sum(-1).min(1)
            total = nearest.sum()
            # every row sits on a taken seed: any row is as good as another
            choice = rng.choice(len(features), p=nearest / total) if total > 0 else rng.integers(len(features))
        seeds.append(features[choice][None])
    return np.concatenate(seeds)


def ncd_kmeans(features: np.ndarray, known_centroids: Optional[np.ndarray], k: int, n_init: int = 10,
               seed: int = 0) -> KMeans:
    """The fitted scikit-learn ``KMeans`` of ``k`` clusters on the novel rows ``features``, of
    ``n_init`` runs from :func:`ncd_kmeans_seeds` the one of least inertia. As in the official code
    (``update_centroids="unlab_only"``) the known centroids only shape the seeding: Lloyd's
    iterations move and assign to the new centroids alone. Without ``known_centroids`` (``None`` or
    no rows) it is scikit-learn's own k-means++ with ``n_init`` restarts: the k-means baseline.

    Example:
        >>> rows = np.array([[0.0], [0.1], [4.0], [4.1], [8.0], [8.1]])
        >>> ncd_kmeans(rows, np.array([[-4.0]]), 3).predict(np.array([[4.05]])).shape
        (1,)
    """
    if known_centroids is None or len(known_centroids) == 0:
        return KMeans(k, n_init=n_init, random_state=seed).fit(features)
    rng = np.random.default_rng(seed)
    runs = [KMeans(k, init=ncd_kmeans_seeds(features, known_centroids, k, rng), n_init=1).fit(features)
            for _ in range(n_init)]
    return min(runs, key=lambda run: run.inertia_)


def mst_rbf_width(features: np.ndarray, min_dist: float) -> float:
    """The RBF width ``σ`` at which the longest edge ``d`` of the minimum spanning tree of
    ``features`` (Euclidean) gets the affinity ``exp(-d² / (2σ²)) = min_dist``: every spanning-tree
    edge then keeps at least ``min_dist``, so the graph cannot fall apart into pieces."""
    if not 0.0 < min_dist < 1.0:
        raise ValueError(f"mst_rbf_width: min_dist {min_dist} must lie in (0, 1). Fix: e.g. the code's 0.6.")
    longest = float(minimum_spanning_tree(squareform(pdist(features))).max())
    return float(np.sqrt(-(longest**2) / (2.0 * np.log(min_dist))))


def ncd_spectral_clustering(features: np.ndarray, known_features: Optional[np.ndarray],
                            known_labels: Optional[np.ndarray], k: int, min_dist: float = 0.6,
                            n_components: Optional[int] = None, n_init: int = 10, seed: int = 0) -> np.ndarray:
    """Cluster ids ``(N,)`` of the novel rows ``features`` by NCD spectral clustering (the code's
    ``fit_predict_known_and_unknown``): the RBF graph of the novel and known rows together (width
    :func:`mst_rbf_width`), its spectral embedding in ``n_components`` dimensions (default: ``k`` plus
    the number of known classes), and :func:`ncd_kmeans` on the novel rows' embedding with the known
    classes' centroids there. Without known rows, the novel rows' own graph and ``k`` dimensions
    (``fit_predict_simple``): plain spectral clustering."""
    known = np.empty((0, features.shape[1])) if known_features is None else np.asarray(known_features)
    classes = np.unique(known_labels) if len(known) else np.empty(0)
    joint = np.concatenate([features, known]) if len(known) else features
    width = mst_rbf_width(joint, min_dist)
    affinity = np.exp(-squareform(pdist(joint, "sqeuclidean")) / (2.0 * width**2))
    np.fill_diagonal(affinity, 0.0)
    dims = n_components or k + len(classes)
    embedding = spectral_embedding(affinity, n_components=dims, norm_laplacian=True, drop_first=True,
                                   random_state=seed)
    novel, known_embedded = embedding[: len(features)], embedding[len(features):]
    centroids = np.stack([known_embedded[known_labels == c].mean(0) for c in classes]) if len(classes) else None
    return ncd_kmeans(novel, centroids, k, n_init=n_init, seed=seed).labels_


def class_centroids(features: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """``(C, D)`` mean of each class's rows, classes in increasing order."""
    return np.stack([features[labels == c].mean(0) for c in np.unique(labels)])


def discover(features: np.ndarray, known_features: np.ndarray, known_labels: np.ndarray, clustering: Clustering,
             num_novel: Optional[int], k_min: int = 2, k_max: int = 30, min_dist: float = 0.6, n_init: int = 10,
             seed: int = 0) -> tuple[np.ndarray, int]:
    """``(cluster ids of the novel rows, number of clusters)``: ``num_novel`` clusters, or (``None``)
    as many as :func:`estimate_class_count` finds in ``features``, by ``clustering`` (``"kmeans"``:
    scikit-learn's k-means on the novel rows alone; ``"ncd_kmeans"``: :func:`ncd_kmeans` with the
    known classes' centroids; ``"ncd_spectral"``: :func:`ncd_spectral_clustering`)."""
    if clustering not in CLUSTERINGS:
        raise ValueError(f"discover: clustering {clustering!r} is not one of {list(CLUSTERINGS)}. Fix: pick one.")
    k = num_novel if num_novel is not None else estimate_class_count(features, k_min, k_max, n_init, seed)[0]
    if clustering == "ncd_spectral":
        return ncd_spectral_clustering(features, known_features, known_labels, k, min_dist, n_init=n_init, seed=seed), k
    centroids = class_centroids(known_features, known_labels) if clustering == "ncd_kmeans" else None
    return ncd_kmeans(features, centroids, k, n_init=n_init, seed=seed).labels_, k


def discovery_scores(features: np.ndarray, known_features: np.ndarray, known_labels: np.ndarray,
                     true_novel: np.ndarray, count: int, clustering: Clustering, estimate_num_novel: bool,
                     scored: Optional[np.ndarray] = None, **options: Any) -> dict[str, float]:
    """:func:`discover` on the novel rows ``features`` (true classes ``true_novel`` in ``0..count-1``,
    read only to score them; ``count`` clusters unless ``estimate_num_novel``), scored:
    ``pool_acc_new`` (Hungarian accuracy, :class:`~reglab.metrics.ClusteringAccuracy`, on the rows
    of the boolean mask ``scored``, default all: the assignment of clusters to classes is made on
    those rows alone, so the other rows' labels are never read), ``num_novel`` (the clusters used)
    and ``num_novel_error`` (``|num_novel - count|``). ``options``: :func:`discover`'s ``k_min``,
    ``k_max``, ``min_dist``, ``n_init``, ``seed``.

    Example:
        >>> rows = np.array([[0.0], [0.1], [5.0], [5.1]])
        >>> discovery_scores(rows, rows[:0], np.empty(0), np.array([1, 1, 0, 0]), 2, "kmeans", False)
        {'pool_acc_new': 1.0, 'num_novel': 2.0, 'num_novel_error': 0.0}
    """
    preds, k = discover(features, known_features, known_labels, clustering, None if estimate_num_novel else count,
                        **options)
    rows = np.ones(len(features), dtype=bool) if scored is None else np.asarray(scored, dtype=bool)
    metric = ClusteringAccuracy(count, [], num_clusters=k)
    metric.update(torch.as_tensor(preds[rows]), torch.as_tensor(true_novel[rows]))
    return {"pool_acc_new": float(metric.compute()["all"]), "num_novel": float(k),
            "num_novel_error": float(abs(k - count))}


def hidden_class_folds(known_classes: Sequence[int], n_folds: int, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    """``[(kept, hidden), ...]``: the known classes shuffled (seeded) and cut into ``n_folds`` near-equal
    folds of at least two classes each (a class count is estimated from two clusters up); each fold in
    turn is hidden, the others kept.

    Example:
        >>> [(sorted(kept + hidden), len(hidden)) for kept, hidden in hidden_class_folds([0, 1, 2, 3, 4], 2)]
        [([0, 1, 2, 3, 4], 3), ([0, 1, 2, 3, 4], 2)]
    """
    classes = [int(c) for c in known_classes]
    if n_folds < 2 or len(classes) < 2 * n_folds:
        raise ValueError(f"hidden_class_folds: {len(classes)} known classes cannot make {n_folds} folds of two or "
                         "more classes (at least 2 folds). Fix: fewer folds, or more known classes.")
    shuffled = np.random.default_rng(seed).permutation(classes)
    folds = [sorted(int(c) for c in fold) for fold in np.array_split(shuffled, n_folds)]
    return [([c for c in classes if c not in fold], fold) for fold in folds]


def select_on_hidden_classes(grid: Mapping[str, Sequence[Any]], folds: Sequence[tuple[list[int], list[int]]],
                             score: Callable[[dict[str, Any], list[int], list[int]], float],
                             ) -> tuple[dict[str, Any], list[tuple[dict[str, Any], float]]]:
    """``(best candidate, [(candidate, mean score), ...])`` over the grid's every combination, each
    scored ``score(candidate, kept, hidden)`` on every fold and averaged; the first best wins ties.

    Example:
        >>> best, table = select_on_hidden_classes({"w": [0.2, 0.8]}, [([0], [1, 2])], lambda c, k, h: c["w"])
        >>> best, [round(mean, 1) for _, mean in table]
        ({'w': 0.8}, [0.2, 0.8])
    """
    if not grid or any(len(values) == 0 for values in grid.values()):
        raise ValueError(f"select_on_hidden_classes: the grid {dict(grid)} has no candidate. Fix: give every "
                         "hyperparameter at least one value.")
    candidates = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    table = [(candidate, float(np.mean([score(candidate, kept, hidden) for kept, hidden in folds])))
             for candidate in candidates]
    return max(table, key=lambda row: row[1])[0], table
