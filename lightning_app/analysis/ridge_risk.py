"""More is better (paper 67, Simon, Karkada, Ghosh & Belkin 2024): the test risk of random-feature
ridge regression with the ridge tuned optimally decreases with the number of features k (width)
and with the number of samples n.

The setting follows the official code (github.com/dkarkada/more-is-better, ``scripts/rf-gaussian.py``
and ``theory.py``): Gaussian data with power-law eigenstructure — latent z ~ N(0, I_M), kernel
eigenvalues λ_i = i^−α and target y = Σ_i v_i z_i + ε with v_i ∝ i^−β/2, ||v|| = 1 (α = 1.2,
β = 1.4, noise variance 0 by default) — and the Gaussian random-feature map φ(z) = F z with
F = P·diag(√λ), P ~ N(0, 1/M) of shape (M, M); a model of width k uses k of those M features,
rescaled by √(M/k) (``rf_krr``'s ``keep_inds``), so that every width estimates the same kernel. The
ridge δ is that of min ||y − Φβ||² + δ||β||² (the official K + δI). The official code picks the
ridge with the lowest *test* risk on a grid (10^−3 … 10^2); here it is picked on a held-out
validation set (``tuning: validation``, the default, so the reported risk is not tuned on its own
test points) or, as in the paper, on the test set (``tuning: oracle``), from a grid that also holds
δ = 0 (the min-norm interpolator). A fixed small ridge (``tuning: fixed``) shows what tuning buys:
its risk peaks where k = n (double descent). The sweeps are nested, as in the paper's experiments:
the widths share features (the first k of one draw of P) and the sample sizes share samples (the
first n of one draw), so a curve moves by what is added, not by a fresh draw.

Written by hand: one SVD of the feature matrix gives the ridge solution for every δ of the grid
(scikit-learn's ``Ridge`` refits per δ; the tests check the two agree).

Example:
    >>> risks = risk_curves(seed=0, widths=[4, 16, 64], samples=[8, 32, 128], fixed_width=16,
    ...                     fixed_samples=32, dim=128, n_test=200, n_val=200)
    >>> len(risks["width"]), risks["width"][0] > risks["width"][-1]
    (3, True)

Command: ``reglab ridge-risk --out DIR`` (:func:`main`) draws risk vs width and risk vs samples for
tuned and fixed ridges. The claim protocol ``ridge_risk`` (:class:`RidgeRiskProtocol`) measures the
curves per seed and turns "monotone" into a number: the largest relative rise along each curve.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from reglab.analysis.outputs import new_outputs
from reglab.bench.protocols import ClaimError, Protocol, register_protocol

TUNINGS = ("validation", "oracle", "fixed")
#: the ridge grid's log10 range and size: δ = 0 and 10^-5 … 10^3 (the official 10^-3 … 10^2, widened at both ends)
DEFAULT_RIDGE_EXPONENTS = (-5, 3, 33)
DEFAULT_WIDTHS = (8, 16, 32, 64, 128, 256, 512, 1024)
DEFAULT_SAMPLES = (8, 16, 32, 64, 128, 256, 512, 1024)


class RidgeRiskError(ValueError):
    """Bad input to the random-feature ridge analysis (message: the problem and the fix)."""


def ridge_grid(low: float, high: float, count: int) -> list[float]:
    """δ = 0 (the min-norm interpolator) and ``count`` ridges 10^low … 10^high, log-spaced.

    Example:
        >>> ridge_grid(-1, 1, 3)
        [0.0, 0.1, 1.0, 10.0]
    """
    return [0.0, *np.logspace(low, high, count).tolist()]


DEFAULT_RIDGES = tuple(ridge_grid(*DEFAULT_RIDGE_EXPONENTS))


def powerlaw_task(dim: int, alpha: float, beta: float) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues λ_i = i^−α and unit-norm target coefficients v_i ∝ i^−β/2, i = 1 … dim."""
    index = np.arange(1, dim + 1, dtype=float)
    coefficients = index ** (-beta / 2)
    return index ** -alpha, coefficients / np.linalg.norm(coefficients)


def ridge_predictions(features: np.ndarray, targets: np.ndarray, eval_features: np.ndarray,
                      ridges: Sequence[float]) -> np.ndarray:
    """Predictions at ``eval_features`` of ridge regression without intercept, min ||y − Φβ||² + δ||β||²,
    for every δ in ``ridges`` (δ = 0: the min-norm least-squares solution), shape (len(ridges), n_eval).

    Example:
        >>> ridge_predictions(np.array([[1.0], [1.0]]), np.array([1.0, 3.0]), np.array([[1.0]]), [0.0, 2.0])
        array([[2.],
               [1.]])
    """
    u, s, vt = np.linalg.svd(features, full_matrices=False)
    keep = s > s.max(initial=0.0) * max(features.shape) * np.finfo(float).eps  # the pseudo-inverse's cut
    u, s, vt = u[:, keep], s[keep], vt[keep]
    projected = u.T @ targets
    eval_basis = eval_features @ vt.T
    shrink = s[None, :] / (s[None, :] ** 2 + np.asarray(ridges, dtype=float)[:, None])
    return (shrink * projected[None, :]) @ eval_basis.T


class RandomFeatureTask:
    """One draw (seed) of the power-law data and of the feature map: train, validation and test sets,
    and features of any width up to ``dim``."""

    def __init__(self, seed: int, dim: int = 1024, n_train: int = 1024, n_val: int = 1000, n_test: int = 2000,
                 alpha: float = 1.2, beta: float = 1.4, noise: float = 0.0) -> None:
        if min(dim, n_train, n_val, n_test) < 1 or noise < 0:
            raise RidgeRiskError(f"ridge_risk: dim={dim}, n_train={n_train}, n_val={n_val}, n_test={n_test}, "
                                 f"noise={noise}. Fix: positive sizes and a noise variance >= 0.")
        rng = np.random.default_rng(seed)
        eigenvalues, self.coefficients = powerlaw_task(dim, alpha, beta)
        self.dim = dim
        self.map = rng.normal(0.0, 1.0 / np.sqrt(dim), size=(dim, dim)) * np.sqrt(eigenvalues)[None, :]
        self.splits = {}
        for name, size in (("train", n_train), ("val", n_val), ("test", n_test)):
            latent = rng.normal(size=(size, dim))
            self.splits[name] = (latent @ self.map.T, latent @ self.coefficients + rng.normal(0.0, np.sqrt(noise), size))

    def features(self, split: str, width: int, samples: int | None = None) -> np.ndarray:
        """The first ``width`` features (rescaled by √(dim/width)) of the first ``samples`` rows of ``split``."""
        if not 1 <= width <= self.dim:
            raise RidgeRiskError(f"ridge_risk: width {width} is outside 1 … {self.dim}. Fix: a width up to `dim`.")
        return self.splits[split][0][:samples, :width] * np.sqrt(self.dim / width)

    def test_risk(self, width: int, samples: int, tuning: str, ridges: Sequence[float], fixed_ridge: float) -> float:
        """Test MSE of width-``width`` ridge regression on the first ``samples`` training rows, with the
        ridge from ``ridges`` best on the validation set (``validation``) or the test set (``oracle``),
        or ``fixed_ridge`` (``fixed``)."""
        if samples > len(self.splits["train"][1]):
            raise RidgeRiskError(f"ridge_risk: {samples} samples, but the draw has {len(self.splits['train'][1])} "
                                 "training rows. Fix: raise n_train or lower the sample sizes.")
        grid = [fixed_ridge] if tuning == "fixed" else list(ridges)
        targets = self.splits["train"][1][:samples]
        train = self.features("train", width, samples)
        chooser = "test" if tuning == "oracle" else "val"
        choose = ridge_predictions(train, targets, self.features(chooser, width), grid)
        best = int(np.argmin(np.mean((choose - self.splits[chooser][1][None, :]) ** 2, axis=1)))
        test = ridge_predictions(train, targets, self.features("test", width), [grid[best]])[0]
        return float(np.mean((test - self.splits["test"][1]) ** 2))


def risk_curves(seed: int, widths: Sequence[int] = DEFAULT_WIDTHS, samples: Sequence[int] = DEFAULT_SAMPLES,
                fixed_width: int = 256, fixed_samples: int = 256, tuning: str = "validation",
                ridges: Sequence[float] = DEFAULT_RIDGES, fixed_ridge: float = 1e-4, dim: int = 1024,
                n_val: int = 1000, n_test: int = 2000, alpha: float = 1.2, beta: float = 1.4,
                noise: float = 0.0) -> dict[str, list[float]]:
    """Test risk vs width (at ``fixed_samples``) and vs samples (at ``fixed_width``) on one draw."""
    if tuning not in TUNINGS:
        raise RidgeRiskError(f"ridge_risk: tuning {tuning!r}. Fix: one of {list(TUNINGS)}.")
    if list(widths) != sorted(set(widths)) or list(samples) != sorted(set(samples)) or len(widths) < 2 or len(samples) < 2:
        raise RidgeRiskError(f"ridge_risk: widths {list(widths)} / samples {list(samples)} must each be two or more "
                             "increasing sizes. Fix: list them in increasing order.")
    task = RandomFeatureTask(seed, dim, max(*samples, fixed_samples), n_val, n_test, alpha, beta, noise)
    return {"width": [task.test_risk(k, fixed_samples, tuning, ridges, fixed_ridge) for k in widths],
            "samples": [task.test_risk(fixed_width, n, tuning, ridges, fixed_ridge) for n in samples]}


def largest_rise(curve: Sequence[float]) -> float:
    """The largest relative increase between neighbours, max_i (R_{i+1} − R_i) / R_i: ≤ 0 exactly when
    the curve never rises.

    Example:
        >>> largest_rise([4.0, 2.0, 3.0, 1.0])
        0.5
    """
    values = np.asarray(curve, dtype=float)
    return float(np.max(np.diff(values) / values[:-1]))


def plot_risk_curves(curves: dict[str, dict[str, np.ndarray]], widths: Sequence[int], samples: Sequence[int],
                     fixed_width: int, fixed_samples: int, path: Path, title: str) -> None:
    """Risk vs width and risk vs samples (log-log), one line per label (mean ± std over seeds):
    ``curves[label]["width"]`` and ``["samples"]`` are arrays (seeds, points)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, axis, xs, label_x in ((axes[0], "width", widths, f"width k (n = {fixed_samples})"),
                                  (axes[1], "samples", samples, f"samples n (k = {fixed_width})")):
        for label, values in curves.items():
            mean, std = values[axis].mean(0), values[axis].std(0)
            ax.plot(xs, mean, "o-", label=label)
            ax.fill_between(xs, np.maximum(mean - std, mean * 1e-3), mean + std, alpha=0.2)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(label_x)
        ax.set_ylabel("test risk (MSE)")
        ax.set_title(f"risk vs {axis}")
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@register_protocol("ridge_risk")
class RidgeRiskProtocol(Protocol):
    """Arms are tunings (``tuning``: one of :data:`TUNINGS`, optionally ``fixed_ridge``); per seed s one
    draw of data and features (seed s), the two risk curves of :func:`risk_curves`, and the metrics
    ``width/largest_rise``, ``samples/largest_rise`` (:func:`largest_rise`), ``width/last_over_first``
    and ``samples/last_over_first`` (risk at the largest size over that at the smallest). A claim
    file names ``module: reglab.analysis.ridge_risk``."""

    defaults = {"widths": list(DEFAULT_WIDTHS), "samples": list(DEFAULT_SAMPLES), "fixed_width": 256,
                "fixed_samples": 256, "ridge_exponents": list(DEFAULT_RIDGE_EXPONENTS), "dim": 1024,
                "n_val": 1000, "n_test": 2000, "alpha": 1.2, "beta": 1.4, "noise": 0.0}

    def check_settings(self) -> None:
        s = self.settings
        if max(*s["widths"], s["fixed_width"]) > s["dim"]:
            raise ClaimError(f"claim {self.claim_name}: widths up to {max(*s['widths'], s['fixed_width'])} but "
                             f"dim {s['dim']} features. Fix: raise `dim` or lower the widths.")

    def check_arm(self, arm: str, spec: dict[str, Any]) -> None:
        if spec.get("tuning") not in TUNINGS or set(spec) - {"tuning", "fixed_ridge"}:
            raise ClaimError(f"claim {self.claim_name}, arm {arm}: an arm is `tuning: <one of {list(TUNINGS)}>` "
                             f"(and optionally fixed_ridge), got {spec}")

    def describe(self) -> list[str]:
        s = self.settings
        low, high, count = s["ridge_exponents"]
        return [f"Power-law Gaussian task (dim {s['dim']}, α = {s['alpha']}, β = {s['beta']}, noise variance "
                f"{s['noise']}), Gaussian random features; risk on {s['n_test']} test points; the ridge picked "
                f"from 0 and {count} values 1e{low} … 1e{high} on {s['n_val']} validation points (validation), "
                f"on the test points (oracle), or fixed. Widths {s['widths']} at n = {s['fixed_samples']}; "
                f"samples {s['samples']} at k = {s['fixed_width']}.", ""]

    def run_arm(self, arm: str, spec: dict[str, Any], seed: int, workdir: Path) -> dict[str, Any]:
        s = self.settings
        curves = risk_curves(seed, s["widths"], s["samples"], s["fixed_width"], s["fixed_samples"], spec["tuning"],
                             ridge_grid(*s["ridge_exponents"]), spec.get("fixed_ridge", 1e-4), s["dim"], s["n_val"], s["n_test"],
                             s["alpha"], s["beta"], s["noise"])
        metrics: dict[str, Any] = {}
        for axis, curve in curves.items():
            metrics |= {f"{axis}/largest_rise": largest_rise(curve), f"{axis}/last_over_first": curve[-1] / curve[0],
                        f"curve:{axis}": curve}
        return metrics

    def figures(self, runs: dict[str, list[dict[str, Any]]], out_dir: Path, claim_name: str) -> list[str]:
        s = self.settings
        curves = {arm: {axis: np.array([run[f"curve:{axis}"] for run in seeds]) for axis in ("width", "samples")}
                  for arm, seeds in runs.items()}
        path = out_dir / f"{claim_name}_risk.png"
        plot_risk_curves(curves, s["widths"], s["samples"], s["fixed_width"], s["fixed_samples"], path,
                         f"{claim_name}: mean ± std over {len(next(iter(runs.values())))} seeds")
        return ["## Test risk vs width and vs samples", "", f"![risk curves]({path.name})", ""]


def main(argv: list[str]) -> None:
    """``reglab ridge-risk``: draw test risk vs width and vs samples of random-feature ridge regression."""
    parser = argparse.ArgumentParser(
        prog="reglab ridge-risk",
        description="Random-feature ridge regression on a power-law Gaussian task (paper 67): test risk vs width "
        "and vs samples with the ridge tuned (on validation, or oracle) and fixed. Writes ridge_risk.png and "
        "ridge_risk.json into --out (never over existing files).")
    parser.add_argument("--out", type=Path, required=True, help="folder for the figure and the numbers")
    parser.add_argument("--seeds", type=int, default=1, help="draws of data and features")
    parser.add_argument("--tunings", nargs="+", default=["validation", "fixed"], choices=TUNINGS)
    parser.add_argument("--fixed_ridge", type=float, default=1e-4, help="the ridge of the `fixed` curve")
    parser.add_argument("--widths", type=int, nargs="+", default=list(DEFAULT_WIDTHS))
    parser.add_argument("--samples", type=int, nargs="+", default=list(DEFAULT_SAMPLES))
    parser.add_argument("--fixed_width", type=int, default=256, help="width of the risk-vs-samples curve")
    parser.add_argument("--fixed_samples", type=int, default=256, help="samples of the risk-vs-width curve")
    parser.add_argument("--dim", type=int, default=1024, help="latent dimension = most features")
    parser.add_argument("--alpha", type=float, default=1.2, help="eigenvalue decay λ_i = i^-alpha")
    parser.add_argument("--beta", type=float, default=1.4, help="target decay v_i^2 ∝ i^-beta")
    parser.add_argument("--noise", type=float, default=0.0, help="label noise variance")
    args = parser.parse_args(argv)
    targets = new_outputs("reglab ridge-risk", args.out, ["ridge_risk.png", "ridge_risk.json"])
    try:
        runs = {tuning: [risk_curves(seed, args.widths, args.samples, args.fixed_width, args.fixed_samples, tuning,
                                     fixed_ridge=args.fixed_ridge, dim=args.dim, alpha=args.alpha, beta=args.beta,
                                     noise=args.noise) for seed in range(args.seeds)] for tuning in args.tunings}
    except RidgeRiskError as error:
        raise SystemExit(f"reglab {error}") from None
    curves = {tuning: {axis: np.array([run[axis] for run in seeds]) for axis in ("width", "samples")}
              for tuning, seeds in runs.items()}
    args.out.mkdir(parents=True, exist_ok=True)
    plot_risk_curves(curves, args.widths, args.samples, args.fixed_width, args.fixed_samples, targets[0],
                     f"random-feature ridge regression ({args.seeds} seed(s))")
    targets[1].write_text(json.dumps({"settings": vars(args) | {"out": str(args.out)}, "runs": runs}, indent=1))
    for tuning, values in curves.items():
        print(f"{tuning}: largest rise along width {max(largest_rise(c) for c in values['width']):+.3f}, "
              f"along samples {max(largest_rise(c) for c in values['samples']):+.3f}")
    print(f"wrote {targets[0]} and {targets[1]}")
