"""Gaussian naive Bayes as the linear-evaluation head (paper 37: Zheng et al., "Revisiting
Discriminative vs. Generative Classifiers: Theory and Implications", ICML 2023).

The official ``models/gaussnb.py`` (github.com/ML-GSAI/Revisiting-Dis-vs-Gen-Classifiers) fits, per
class ``c``, the mean ``mu_c`` and the per-dimension variance ``var_c`` (population variance plus
``var_epsilon`` = 1e-9) and the prior ``pi_c = n_c / n``; it predicts with one variance shared by
all classes, their prior-weighted average ``var = sum_c pi_c var_c``:

    logit_c(x) = log pi_c - 1/2 sum_j (x_j - mu_cj)^2 / var_j.

With the variance shared, the class-dependent part is linear in ``x`` (``x . mu_c / var`` plus a
constant), which is why the paper calls it a linear-evaluation head next to logistic regression;
it is evaluated in the quadratic form above (in float64) because with one shot per class the
variance is ``var_epsilon`` and the expanded linear form would cancel numbers of order 1e9.
Written by hand in torch: scikit-learn's ``GaussianNB`` keeps one variance per class and scales its
epsilon by the largest variance, which is not the paper's head.

Method card (what it does, when it helps, what it costs): ``naive_bayes_probe.card.yaml`` beside this module.

Example:
    >>> import torch
    >>> head = gaussian_naive_bayes(torch.tensor([[0.0], [0.2], [1.0], [1.2]], dtype=torch.float64),
    ...                             torch.tensor([0, 0, 1, 1]), num_classes=2)
    >>> head(torch.tensor([[0.3], [0.9]], dtype=torch.float64)).argmax(-1).tolist()
    [0, 1]
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .probes import FrozenFeatureProbe, Head


def gaussian_naive_bayes(features: Tensor, labels: Tensor, num_classes: int, var_epsilon: float = 1e-9) -> Head:
    """The official naive Bayes head fitted on ``(N, D)`` features (module docstring); classes
    without samples get prior 0 (logit ``-inf``)."""
    features = features.double()
    counts = torch.bincount(labels, minlength=num_classes).to(features.dtype)
    one_hot = torch.nn.functional.one_hot(labels, num_classes).to(features.dtype)  # (N, C)
    sizes = counts.clamp_min(1)[:, None]
    means = one_hot.T @ features / sizes
    variances = one_hot.T @ features.square() / sizes - means.square()
    prior = counts / counts.sum()
    shared = (prior[:, None] * (variances.clamp_min(0) + var_epsilon)).sum(0)
    log_prior = prior.log()

    def head(x: Tensor) -> Tensor:
        squared = ((x.double()[:, None, :] - means.to(x.device)) ** 2 / shared.to(x.device)).sum(-1)
        return log_prior.to(x.device) - 0.5 * squared

    return head


class GaussianNaiveBayesProbe(FrozenFeatureProbe):
    """Evaluate with the Gaussian naive Bayes head fitted on the frozen training features
    (module docstring; the mechanism: :class:`~reglab.callbacks.vision_language.probes.FrozenFeatureProbe`).

    Args:
        var_epsilon: added to every variance (official 1e-9).
        shots_per_class, seed, minmax, predict_in: see ``FrozenFeatureProbe``.

    Example:
        >>> GaussianNaiveBayesProbe(shots_per_class=5).name
        'naive_bayes_probe'
    """

    name = "naive_bayes_probe"

    def __init__(self, var_epsilon: float = 1e-9, shots_per_class: int | None = None, seed: int = 0,
                 minmax: bool = True, predict_in: Sequence[str] = ("validate", "test", "predict")) -> None:
        if var_epsilon <= 0:
            raise self.fail(f"var_epsilon={var_epsilon} leaves a zero variance with one sample per class",
                            "pass a positive var_epsilon (official 1e-9)")
        super().__init__(shots_per_class=shots_per_class, seed=seed, minmax=minmax, predict_in=predict_in)
        self.var_epsilon = var_epsilon

    def fit_head(self, features: Tensor, labels: Tensor, num_classes: int) -> Head:
        return gaussian_naive_bayes(features, labels, num_classes, self.var_epsilon)
