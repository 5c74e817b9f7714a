"""Logistic regression as the linear-evaluation head: the discriminative side of paper 37's comparison
(and the default linear probe of self-supervised and CLIP evaluations).

scikit-learn's ``LogisticRegression`` fits it (multinomial, L2 penalty ``C`` = 1, L-BFGS, 1000
iterations: the official ``lr_bgfs`` model of github.com/ML-GSAI/Revisiting-Dis-vs-Gen-Classifiers,
``main_train_offline.py``); its coefficients become a linear head in torch. Nothing is written by
hand beyond moving the fitted weights.

Method card (what it does, when it helps, what it costs): ``logistic_regression_probe.card.yaml`` beside this module.

Example:
    >>> import torch
    >>> head = logistic_regression(torch.tensor([[0.0], [0.2], [1.0], [1.2]], dtype=torch.float64),
    ...                            torch.tensor([0, 0, 1, 1]), num_classes=3)
    >>> head(torch.tensor([[0.0], [1.2]], dtype=torch.float64)).argmax(-1).tolist()
    [0, 1]
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .probes import FrozenFeatureProbe, Head


def logistic_regression(features: Tensor, labels: Tensor, num_classes: int, C: float = 1.0,
                        max_iter: int = 1000) -> Head:
    """scikit-learn's multinomial logistic regression on ``(N, D)`` features as a linear head over
    ``num_classes`` (classes absent from ``labels`` get logit ``-inf``)."""
    from sklearn.linear_model import LogisticRegression

    present = labels.unique().cpu()
    weight = torch.zeros(num_classes, features.shape[1], dtype=torch.float64)
    bias = torch.full((num_classes,), float("-inf"), dtype=torch.float64)
    if len(present) == 1:  # scikit-learn refuses a single class; the head then predicts it everywhere
        bias[present] = 0.0
    else:
        model = LogisticRegression(C=C, max_iter=max_iter).fit(features.double().cpu().numpy(), labels.cpu().numpy())
        coef, intercept = torch.from_numpy(model.coef_), torch.from_numpy(model.intercept_)
        if len(present) == 2:  # the binary case comes back as one row: logit of the second class
            coef, intercept = torch.cat([-coef / 2, coef / 2]), torch.cat([-intercept / 2, intercept / 2])
        weight[present], bias[present] = coef, intercept

    def head(x: Tensor) -> Tensor:
        return x.double() @ weight.to(x.device).T + bias.to(x.device)

    return head


class LogisticRegressionProbe(FrozenFeatureProbe):
    """Evaluate with a logistic-regression head fitted on the frozen training features (module
    docstring; the mechanism: :class:`~reglab.callbacks.vision_language.probes.FrozenFeatureProbe`).

    Args:
        C: inverse L2 strength (official 1).
        max_iter: L-BFGS iterations (official 1000).
        shots_per_class, seed, minmax, predict_in: see ``FrozenFeatureProbe``.

    Example:
        >>> LogisticRegressionProbe(shots_per_class=5).name
        'logistic_regression_probe'
    """

    name = "logistic_regression_probe"

    def __init__(self, C: float = 1.0, max_iter: int = 1000, shots_per_class: int | None = None, seed: int = 0,
                 minmax: bool = True, predict_in: Sequence[str] = ("validate", "test", "predict")) -> None:
        if C <= 0 or max_iter < 1:
            raise self.fail(f"C={C}, max_iter={max_iter}", "pass C > 0 (inverse L2 strength) and max_iter >= 1")
        super().__init__(shots_per_class=shots_per_class, seed=seed, minmax=minmax, predict_in=predict_in)
        self.C, self.max_iter = C, max_iter

    def fit_head(self, features: Tensor, labels: Tensor, num_classes: int) -> Head:
        return logistic_regression(features, labels, num_classes, self.C, self.max_iter)
