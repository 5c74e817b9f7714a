"""Tree ensembles as smoothers (paper 43, Curth, Jeffares & van der Schaar 2024): the smoothing
weights of a random forest and of its trees, and their effective number of parameters, at the
training inputs and away from them.

A regression tree predicts at x the (bootstrap-weighted) mean of the training outcomes in x's leaf,
so every tree, and the forest that averages them, is a *smoother*: f(x) = Σ_i ŝ_i(x) y_i. For
tree b with leaf ℓ_b(x) and bootstrap counts c_bi (how often training point i was drawn),

    ŝ^b_i(x) = c_bi · 1[ℓ_b(x_i) = ℓ_b(x)] / Σ_j c_bj · 1[ℓ_b(x_j) = ℓ_b(x)],

and the forest's weights are their mean ŝ(x) = (1/B) Σ_b ŝ^b(x). The effective number of parameters
of a smoother at a set of inputs {x_j} (the paper's p_ŝ, eq. 2, after Curth et al. 2023) is

    p_ŝ = n / |{x_j}| · Σ_j ||ŝ(x_j)||²,

which is n/k for k-nearest neighbours and the number of leaves for one tree without bootstrap at its
training inputs. The paper's claims: the forest is smoother (smaller p_ŝ) than its trees, and more
so away from the training inputs, where trees disagree about which training points are neighbours.

What came from where: the weights and p_ŝ follow the official code
(github.com/AliciaCurth/understanding-random-forests, ``src/effective_parameters.py`` and
``src/metric_utils.py``: bootstrap counts as weights, rows normalized per tree, forest = mean of the
trees; p = n_train · mean ||ŝ||²), as do the generated data (``src/data_utils.py``: the MARS
additive and multiplicative outcome models on uniform inputs in [0, 1]^d, d = 5, σ = 1, 500
training and 500 test points) and the inputs "away from the training data" (training inputs plus
uniform noise U(−δ, δ) per feature, ``generate_test_x_from_train_with_offset``; here δ is in units
of each feature's training standard deviation, so the same offsets fit the bundled sets). The
official code draws the bootstrap counts with scikit-learn's private ``_generate_sample_indices``;
this module reads the public ``estimators_samples_`` (the same draws, duplicates included).
Classification outcomes are regressed as numbers centred at 0 (y − 0.5), as the official code does
for its binary OpenML sets. Written by hand: scikit-learn fits the trees and says where each input
lands (``apply``) but has no smoothing weights.

Example:
    >>> from sklearn.ensemble import RandomForestRegressor
    >>> data = load_smoother_data("mars_additive", seed=0, n_train=60, n_test=20)
    >>> forest = RandomForestRegressor(n_estimators=5, random_state=0).fit(data.x_train, data.y_train)
    >>> weights = forest_smoothing_weights(forest, data.x_train, data.x_test)
    >>> weights.forest.shape, bool(np.allclose(weights.forest @ data.y_train, forest.predict(data.x_test)))
    ((20, 60), True)
    >>> weights.forest_parameters < weights.tree_parameters
    True

Command: ``reglab smoothers --out DIR`` (:func:`main`) draws the effective number of parameters as
inputs move away from the training data, and the smoothing weights of the forest and of one tree
at a test input. The claim protocol ``smoothers`` (:class:`SmoothersProtocol`) measures the same
per seed.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sklearn import datasets
from sklearn.base import is_regressor
from sklearn.ensemble import RandomForestRegressor

from reglab.analysis.outputs import new_outputs
from reglab.bench.protocols import ClaimError, Protocol, register_protocol

#: the data sets :func:`load_smoother_data` knows: generated (the official MARS outcome models) and bundled
GENERATED = ("mars_additive", "mars_multiplicative")
BUNDLED = {"diabetes": datasets.load_diabetes, "breast_cancer": datasets.load_breast_cancer}
DATASETS = (*GENERATED, *BUNDLED)
#: where the effective parameters are measured: offsets δ (in feature standard deviations) of the
#: training inputs; 0 is the training inputs themselves
DEFAULT_OFFSETS = (0.0, 0.1, 0.25, 0.5, 1.0, 2.0)


class SmootherError(ValueError):
    """Bad input to the smoother analysis (message: the problem and the fix)."""


@dataclass(frozen=True)
class SmootherData:
    """Training inputs and outcomes, and held-out inputs and outcomes, as numpy arrays."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def mars_outcome(x: np.ndarray, additive: bool) -> np.ndarray:
    """The noiseless MARS outcome models of the official code (first five features used)."""
    if additive:
        return 0.1 * np.exp(4 * x[:, 0]) + 4 / (1 + np.exp(-20 * (x[:, 1] - 0.5))) + 3 * x[:, 2] + 2 * x[:, 3] + x[:, 4]
    return 10 * np.sin(np.pi * x[:, 0] * x[:, 1]) + 20 * (x[:, 2] - 0.05) ** 2 + 10 * x[:, 3] + 5 * x[:, 4]


def load_smoother_data(name: str, seed: int, n_train: int = 500, n_test: int = 500, dim: int = 5,
                       noise: float = 1.0) -> SmootherData:
    """A generated set (``mars_additive`` / ``mars_multiplicative``: uniform inputs in [0, 1]^dim,
    Gaussian outcome noise ``noise``) or a bundled one (``diabetes``, ``breast_cancer``: a seeded split
    into ``n_train`` training rows and the rest, capped at ``n_test``, features standardized with
    training statistics; ``n_train`` is capped so that a quarter of the rows stays held out)."""
    if name not in DATASETS:
        raise SmootherError(f"smoothers: unknown data set {name!r}. Fix: use one of {list(DATASETS)}.")
    if n_train < 2 or n_test < 1:
        raise SmootherError(f"smoothers: n_train={n_train}, n_test={n_test}. Fix: at least 2 training and 1 test point.")
    rng = np.random.default_rng(seed)
    if name in GENERATED:
        if dim < 5:
            raise SmootherError(f"smoothers: the MARS outcome models use five features, got dim={dim}. Fix: dim >= 5.")
        x = rng.uniform(0.0, 1.0, size=(n_train + n_test, dim))
        y = mars_outcome(x, additive=name == "mars_additive") + rng.normal(0.0, noise, size=len(x))
        return SmootherData(x[:n_train], y[:n_train], x[n_train:], y[n_train:])
    x, y = BUNDLED[name](return_X_y=True)
    y = y.astype(float) - (0.5 if name == "breast_cancer" else 0.0)
    order = rng.permutation(len(x))
    n_train = min(n_train, (3 * len(x)) // 4)
    train, test = order[:n_train], order[n_train:n_train + n_test]
    mean, std = x[train].mean(0), x[train].std(0)
    std[std == 0] = 1.0
    x = (x - mean) / std
    return SmootherData(x[train], y[train], x[test], y[test])


def offset_inputs(x: np.ndarray, offset: float, scale: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``x`` moved by U(−offset·scale, offset·scale) per feature (the official offset test inputs)."""
    return x + rng.uniform(-1.0, 1.0, size=x.shape) * offset * scale


def tree_smoothing_weights(train_leaves: np.ndarray, eval_leaves: np.ndarray, counts: np.ndarray | None = None) -> np.ndarray:
    """One tree's smoothing weights ŝ(x_j)_i, shape (len(eval_leaves), len(train_leaves)).

    ``train_leaves``/``eval_leaves``: the leaf of each training / evaluation input (``tree.apply``);
    ``counts``: how often each training point is in the tree's bootstrap sample (None: once each).
    An evaluation input whose leaf holds no drawn training point cannot occur for a fitted tree
    (every leaf was grown from drawn points) and raises.

    Example:
        >>> tree_smoothing_weights(np.array([0, 0, 1, 1]), np.array([0]), np.array([2, 1, 1, 0]))
        array([[0.66666667, 0.33333333, 0.        , 0.        ]])
    """
    counts = np.ones(len(train_leaves)) if counts is None else np.asarray(counts, dtype=float)
    same_leaf = eval_leaves[:, None] == train_leaves[None, :]
    weights = same_leaf * counts[None, :]
    totals = weights.sum(axis=1, keepdims=True)
    if np.any(totals == 0):
        raise SmootherError("smoothers: an evaluation input fell in a leaf with no drawn training point. "
                            "Fix: pass the leaves and bootstrap counts of the same fitted tree.")
    return weights / totals


@dataclass(frozen=True)
class SmoothingWeights:
    """A forest's smoothing weights at some inputs, and its trees' (kept as squared norms: the full
    stack of tree weights is n_trees times the forest's memory)."""

    #: the forest's weights, (n_eval, n_train); ``forest @ y_train`` is its prediction
    forest: np.ndarray
    #: ||ŝ^b(x_j)||² of each tree b at each input j, (n_trees, n_eval)
    tree_squared_norms: np.ndarray
    #: the first tree's weights, (n_eval, n_train)
    first_tree: np.ndarray

    @property
    def forest_parameters(self) -> float:
        return effective_parameters(self.forest)

    @property
    def tree_parameters(self) -> float:
        """The trees' mean effective number of parameters."""
        return float(self.forest.shape[1] * self.tree_squared_norms.mean())


def forest_smoothing_weights(forest: RandomForestRegressor, x_train: np.ndarray, x_eval: np.ndarray) -> SmoothingWeights:
    """The smoothing weights at ``x_eval`` of a fitted scikit-learn regression forest (the mean of its
    trees' weights, each with its bootstrap counts from ``estimators_samples_``) and its trees'."""
    if not is_regressor(forest) or not hasattr(forest, "estimators_samples_"):
        raise SmootherError(f"smoothers: {type(forest).__name__} is not a fitted scikit-learn regression forest "
                            "(leaf means of bootstrap samples). Fix: fit a RandomForestRegressor or ExtraTreesRegressor.")
    n_train = len(x_train)
    total = np.zeros((len(x_eval), n_train))
    squared_norms, first = [], None
    for tree, drawn in zip(forest.estimators_, forest.estimators_samples_):
        counts = np.bincount(drawn, minlength=n_train) if forest.bootstrap else None
        weights = tree_smoothing_weights(tree.apply(x_train), tree.apply(x_eval), counts)
        total += weights
        squared_norms.append(np.sum(weights ** 2, axis=1))
        first = weights if first is None else first
    return SmoothingWeights(forest=total / len(forest.estimators_), tree_squared_norms=np.stack(squared_norms),
                            first_tree=first)


def effective_parameters(weights: np.ndarray) -> float:
    """p_ŝ = n_train · mean over evaluation inputs of ||ŝ(x)||² for weights of shape (n_eval, n_train).

    Example:
        >>> effective_parameters(np.array([[0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 0.5, 0.5]]))  # 2 leaves
        2.0
    """
    return float(weights.shape[-1] * np.mean(np.sum(weights ** 2, axis=-1)))


def measure_smoothing(data: SmootherData, seed: int, offsets: Sequence[float] = DEFAULT_OFFSETS,
                      forest_args: dict[str, Any] | None = None) -> dict[str, Any]:
    """Fit a forest (scikit-learn's defaults unless ``forest_args``; ``random_state=seed``) and measure
    its and its trees' effective parameters at the training inputs moved by each offset and at the
    held-out inputs. Metrics: ``<where>/forest_parameters``, ``<where>/tree_parameters`` and
    ``<where>/forest_over_trees`` for where in ``offset_<δ>`` and ``test`` (``offset_0`` is
    ``train``), ``away_over_near`` (forest_over_trees at the test inputs over that at the training
    inputs: below 1 when the forest smooths more, relative to its trees, away from the training
    data), test/train MSE of forest and mean tree; and the weights at the first test input."""
    if 0.0 not in offsets:
        raise SmootherError(f"smoothers: offsets {list(offsets)} lack 0 (the training inputs). Fix: include 0.")
    forest = RandomForestRegressor(**{**(forest_args or {}), "random_state": seed}).fit(data.x_train, data.y_train)
    rng = np.random.default_rng(seed + 1)
    scale = data.x_train.std(axis=0)
    where = {("train" if offset == 0 else f"offset_{offset:g}"): offset_inputs(data.x_train, offset, scale, rng)
             for offset in offsets}
    where["test"] = data.x_test
    metrics: dict[str, Any] = {}
    for name, inputs in where.items():
        weights = forest_smoothing_weights(forest, data.x_train, inputs)
        p_forest, p_trees = weights.forest_parameters, weights.tree_parameters
        metrics |= {f"{name}/forest_parameters": p_forest, f"{name}/tree_parameters": p_trees,
                    f"{name}/forest_over_trees": p_forest / p_trees}
        if name == "test":
            tree_mse = [np.mean((tree.predict(inputs) - data.y_test) ** 2) for tree in forest.estimators_]
            metrics |= {"test/forest_mse": float(np.mean((weights.forest @ data.y_train - data.y_test) ** 2)),
                        "test/tree_mse": float(np.mean(tree_mse)),
                        "example/forest_weights": weights.forest[0].tolist(),
                        "example/tree_weights": weights.first_tree[0].tolist(),
                        "example/distances": np.linalg.norm((data.x_train - data.x_test[0]) / scale, axis=1).tolist()}
    metrics["away_over_near"] = metrics["test/forest_over_trees"] / metrics["train/forest_over_trees"]
    metrics["offsets"] = [float(o) for o in offsets]
    return metrics


def plot_smoothing(runs: dict[str, list[dict[str, Any]]], path: Path, title: str) -> None:
    """Two panels per data set (one row each): effective parameters of the forest and of its trees
    as inputs move away from the training data (mean ± std over runs, the held-out inputs as a
    marker), and the smoothing weights of the forest and of one tree at a test input against the
    training points' distance from it (the first run)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(runs), 2, figsize=(10, 3.6 * len(runs)), squeeze=False)
    for (label, seeds), (left, right) in zip(runs.items(), axes):
        offsets = seeds[0]["offsets"]
        for who, colour in (("forest", "C0"), ("tree", "C1")):
            keys = ["train" if o == 0 else f"offset_{o:g}" for o in offsets]
            values = np.array([[run[f"{k}/{who}_parameters"] for k in keys] for run in seeds])
            left.plot(offsets, values.mean(0), "o-", color=colour, label=f"{who} (mean over trees)" if who == "tree" else who)
            left.fill_between(offsets, values.mean(0) - values.std(0), values.mean(0) + values.std(0), color=colour, alpha=0.2)
            test = [run[f"test/{who}_parameters"] for run in seeds]
            left.errorbar([offsets[-1] * 1.08], [np.mean(test)], yerr=[np.std(test)], fmt="s", color=colour,
                          label=f"{who}, held-out inputs")
        left.set_yscale("log")
        left.set_xlabel("offset δ of the training inputs (feature std)")
        left.set_ylabel("effective parameters p")
        left.set_title(f"{label}: effective parameters")
        left.legend(fontsize=7)
        first = seeds[0]
        right.scatter(first["example/distances"], first["example/tree_weights"], s=12, color="C1", label="one tree")
        right.scatter(first["example/distances"], first["example/forest_weights"], s=8, color="C0", label="forest")
        right.set_xlabel("distance of the training point from the test input (feature std)")
        right.set_ylabel("smoothing weight")
        right.set_title(f"{label}: weights at one test input")
        right.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@register_protocol("smoothers")
class SmoothersProtocol(Protocol):
    """Arms are data sets (``data``: one of :data:`DATASETS`, optionally ``n_train``, ``n_test``); per
    seed s the set is drawn / split with s and a forest fitted with ``random_state=s``; the metrics
    are those of :func:`measure_smoothing`. A claim file names ``module: reglab.analysis.smoothers``."""

    defaults = {"forest": {}, "offsets": list(DEFAULT_OFFSETS), "n_train": 500, "n_test": 500, "noise": 1.0}

    def check_settings(self) -> None:
        try:
            RandomForestRegressor(**self.settings["forest"])
        except TypeError as error:
            raise ClaimError(f"claim {self.claim_name}: `forest` {self.settings['forest']} ({error}). "
                             "Fix: use RandomForestRegressor's arguments.") from None
        if 0 not in self.settings["offsets"]:
            raise ClaimError(f"claim {self.claim_name}: `offsets` lack 0 (the training inputs). Fix: include 0.")

    def check_arm(self, arm: str, spec: dict[str, Any]) -> None:
        if spec.get("data") not in DATASETS or set(spec) - {"data", "n_train", "n_test"}:
            raise ClaimError(f"claim {self.claim_name}, arm {arm}: an arm is `data: <one of {list(DATASETS)}>` "
                             f"(and optionally n_train, n_test), got {spec}")

    def describe(self) -> list[str]:
        s = self.settings
        return [f"scikit-learn RandomForestRegressor({s['forest'] or 'defaults'}); effective parameters "
                "p = n · mean ||ŝ(x)||² of the forest and (mean) of its trees at the training inputs moved by "
                f"U(−δ, δ)·std per feature for δ in {s['offsets']}, and at held-out inputs.", ""]

    def run_arm(self, arm: str, spec: dict[str, Any], seed: int, workdir: Path) -> dict[str, Any]:
        s = self.settings
        data = load_smoother_data(spec["data"], seed, spec.get("n_train", s["n_train"]), spec.get("n_test", s["n_test"]),
                                  noise=s["noise"])
        return measure_smoothing(data, seed, s["offsets"], s["forest"])

    def figures(self, runs: dict[str, list[dict[str, Any]]], out_dir: Path, claim_name: str) -> list[str]:
        path = out_dir / f"{claim_name}_smoothing.png"
        plot_smoothing(runs, path, f"{claim_name}: forest vs its trees, mean ± std over {len(next(iter(runs.values())))} seeds")
        return ["## Effective parameters and smoothing weights", "", f"![effective parameters]({path.name})", ""]


def main(argv: list[str]) -> None:
    """``reglab smoothers``: fit a forest on each data set and draw its and its trees' smoothing."""
    parser = argparse.ArgumentParser(
        prog="reglab smoothers",
        description="Random forests as smoothers (paper 43): effective number of parameters of a forest and of "
        "its trees near and away from the training inputs, and their smoothing weights. Writes smoothers.png "
        "and smoothers.json into --out (never over existing files).")
    parser.add_argument("--out", type=Path, required=True, help="folder for the figure and the numbers")
    parser.add_argument("--data", nargs="+", default=["mars_additive", "diabetes"], choices=DATASETS)
    parser.add_argument("--seeds", type=int, default=1, help="data draws / forests per data set")
    parser.add_argument("--n_train", type=int, default=500)
    parser.add_argument("--n_test", type=int, default=500)
    parser.add_argument("--n_estimators", type=int, default=100)
    parser.add_argument("--max_features", type=float, default=1.0, help="fraction of features tried per split")
    parser.add_argument("--min_samples_leaf", type=int, default=1)
    parser.add_argument("--offsets", type=float, nargs="+", default=list(DEFAULT_OFFSETS))
    args = parser.parse_args(argv)
    targets = new_outputs("reglab smoothers", args.out, ["smoothers.png", "smoothers.json"])
    forest_args = {"n_estimators": args.n_estimators, "max_features": args.max_features,
                   "min_samples_leaf": args.min_samples_leaf}
    try:
        runs = {name: [measure_smoothing(load_smoother_data(name, seed, args.n_train, args.n_test), seed, args.offsets,
                                         forest_args) for seed in range(args.seeds)] for name in args.data}
    except SmootherError as error:
        raise SystemExit(f"reglab {error}") from None
    args.out.mkdir(parents=True, exist_ok=True)
    plot_smoothing(runs, targets[0], f"forest vs its trees ({args.seeds} seed(s))")
    summary = {name: {k: float(np.mean([run[k] for run in seeds])) for k, v in seeds[0].items() if not isinstance(v, list)}
               for name, seeds in runs.items()}
    targets[1].write_text(json.dumps({"settings": vars(args) | {"out": str(args.out)}, "means": summary}, indent=1))
    for name, means in summary.items():
        print(f"{name}: p_forest/p_trees {means['train/forest_over_trees']:.3f} at the training inputs, "
              f"{means['test/forest_over_trees']:.3f} at held-out inputs")
    print(f"wrote {targets[0]} and {targets[1]}")
