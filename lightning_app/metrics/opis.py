"""OPIS, the operating-point inconsistency score (Zhang et al., "Threshold-Consistent Margin Loss for
Open-World Deep Metric Learning", ICLR 2024): how much one similarity threshold means different
things for different classes.

A retrieval system declares a match when two embeddings' cosine similarity is at least a threshold
``d``. For each class ``i`` of the evaluated split, its pairs give a true-positive rate (its
same-class pairs accepted) and a true-negative rate (its pairs with other classes' samples
rejected); their F-beta mean is the class's utility ``U(i, d)``. OPIS is the variance of the
utility across classes, averaged over a calibration range of thresholds:

    OPIS = sum_i w_i * 1/(d_max - d_min) * integral_{d_min}^{d_max} (U(i, d) - U_mean(d))^2 dd

with ``w_i = 1/T`` over the ``T`` classes and ``U_mean(d)`` their mean utility. The calibration
range is where the overall false accept rate (the share of all different-class pairs accepted)
lies in ``far_range``: ``d_min`` accepts ``far_range[1]`` of them, ``d_max`` ``far_range[0]``.
Lower is more consistent: one threshold gives every class the same trade-off. The integral is
the mean over ``num_thresholds`` evenly spaced thresholds.

Source: the paper's method text (no official code was found in this session; PyTorch Metric
Learning ships the TCM loss but not OPIS) — the variance-of-utility definition with equal class
weights, and the utility as the F-score of TPR and TNR (TNR in place of precision, which would
depend on how many negatives each class has). The paper fixes its calibration range per benchmark
as a FAR interval; ``far_range=(1e-3, 1e-1)`` is this module's default, chosen for test sets of the
digits' size (some 3·10^5 different-class pairs resolve a FAR of 1e-3 with hundreds of pairs).
Not implemented: the paper's epsilon-OPIS (the utility gap between the best and worst ``epsilon``
share of classes), meaningless with the five test classes of the digits.

Exact and dense (the full ``N x N`` similarity matrix): fine for thousands of samples, not for
millions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from reglab.metrics.retrieval import EmbeddingStore


class OPIS(EmbeddingStore):
    """Operating-point inconsistency score of cosine-similarity matching (module docstring).

    ``update(embeddings, labels, index)`` stores the batch; ``compute()`` scores every pair of the
    samples seen, each sample once under DDP (:class:`~reglab.metrics.retrieval.EmbeddingStore`).
    Classes with a single sample have no same-class pair and are left out.

    Args:
        far_range: the overall false accept rates at the two ends of the calibration range.
        num_thresholds: thresholds the range is sampled at.
        beta: the F-score's beta (1: the harmonic mean of TPR and TNR).

    Example:
        >>> metric = OPIS()
        >>> same_threshold = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
        >>> metric.update(same_threshold, torch.tensor([0, 0, 1, 1]), torch.arange(4))
        >>> metric.compute().item()  # both classes as tight: one threshold suits both
        0.0
    """

    higher_is_better = False

    def __init__(self, far_range: tuple[float, float] = (1e-3, 1e-1), num_thresholds: int = 100,
                 beta: float = 1.0, **kwargs) -> None:
        super().__init__(**kwargs)
        low, high = (float(rate) for rate in far_range)
        if not 0.0 <= low < high <= 1.0:
            raise ValueError(f"OPIS: far_range must be two false accept rates 0 <= low < high <= 1, got "
                             f"{list(far_range)}. Fix: e.g. far_range=[0.001, 0.1].")
        if num_thresholds < 2 or beta <= 0:
            raise ValueError(f"OPIS: num_thresholds must be at least 2 and beta positive, got {num_thresholds} and "
                             f"{beta}. Fix: e.g. num_thresholds=100, beta=1.0.")
        self.far_range, self.num_thresholds, self.beta = (low, high), int(num_thresholds), float(beta)

    def compute(self) -> Tensor:
        return opis_score(*self.samples(), self.far_range, self.num_thresholds, self.beta)


def accepted_share(sorted_values: Tensor, thresholds: Tensor) -> Tensor:
    """The share of ``sorted_values`` (ascending) at or above each threshold."""
    below = torch.searchsorted(sorted_values, thresholds, side="left")
    return 1.0 - below.float() / len(sorted_values)


def calibration_thresholds(negatives: Tensor, far_range: tuple[float, float], num: int) -> Tensor:
    """``num`` evenly spaced similarity thresholds from the one accepting ``far_range[1]`` of the
    different-class similarities ``negatives`` (ascending) to the one accepting ``far_range[0]``."""
    def threshold_at(far: float) -> Tensor:  # accepts the ceil(far * n) most similar negatives
        accepted = max(1, min(len(negatives), int(torch.tensor(far * len(negatives)).ceil())))
        return negatives[len(negatives) - accepted]

    return torch.linspace(float(threshold_at(far_range[1])), float(threshold_at(far_range[0])), num,
                          device=negatives.device)


def class_utilities(similarity: Tensor, labels: Tensor, thresholds: Tensor, beta: float) -> Tensor:
    """``(T, len(thresholds))``: each class's F-beta of TPR and TNR at each threshold, for the ``T``
    classes with at least two samples."""
    rows = []
    for label in labels.unique():
        members = labels == label
        if int(members.sum()) < 2:
            continue
        block = similarity[members]
        within = block[:, members]
        positives = within[torch.triu(torch.ones_like(within, dtype=torch.bool), diagonal=1)].sort().values
        tpr = accepted_share(positives, thresholds)
        tnr = 1.0 - accepted_share(block[:, ~members].flatten().sort().values, thresholds)
        b2 = beta ** 2
        rows.append(((1 + b2) * tpr * tnr / (b2 * tpr + tnr).clamp_min(1e-12)))
    return torch.stack(rows)


def opis_score(embeddings: Tensor, labels: Tensor, far_range: tuple[float, float] = (1e-3, 1e-1),
               num_thresholds: int = 100, beta: float = 1.0) -> Tensor:
    """OPIS of cosine-similarity matching among ``embeddings`` with class ``labels`` (module docstring)."""
    embeddings = F.normalize(embeddings.float(), dim=-1)
    similarity = embeddings @ embeddings.T
    different = labels[:, None] != labels[None, :]
    counts = torch.bincount(torch.unique(labels, return_inverse=True)[1])
    if not different.any() or int(counts.max()) < 2:
        raise ValueError("OPIS: the samples need two classes and a class with two samples (a same-class and a "
                         "different-class pair). Fix: evaluate on a split with several samples of several classes.")
    upper = torch.triu(torch.ones_like(different), diagonal=1)
    negatives = similarity[different & upper].sort().values
    thresholds = calibration_thresholds(negatives, far_range, num_thresholds)
    utilities = class_utilities(similarity, labels, thresholds, beta)
    return ((utilities - utilities.mean(0)) ** 2).mean(0).mean()
