"""Generalized cross-entropy (Zhang & Sabuncu, NeurIPS 2018) — a robust task-loss baseline.

The negative Box-Cox transform of the probability of the labelled class interpolates between
cross-entropy (q -> 0) and mean absolute error (q = 1), which is robust to label noise:

    L_q(z, y) = (1 - p_y(z)^q) / q,        q = 0.7 (the paper's default)

With soft targets t (after a target transform) the loss is sum_c t_c (1 - p_c^q) / q.

Method card (what it does, when it helps, what it costs): ``gce.card.yaml`` beside this module.

Example:
    >>> from reglab.callbacks import GCE
    >>> GCE(q=0.7).name
    'gce'
"""

from __future__ import annotations

import lightning as L
from torch import Tensor

from reglab.mixins import StepOutput
from reglab.step import target_distribution
from reglab.technique import Technique


def generalized_cross_entropy(logits: Tensor, target: Tensor, q: float) -> Tensor:
    """Per-sample ``sum_c t_c (1 - p_c^q) / q`` (``t`` one-hot for class indices), in fp32."""
    probs = logits.float().softmax(-1).clamp_min(1e-7)
    weights = target_distribution(target, logits.shape[-1])
    return (weights * (1.0 - probs.pow(q))).sum(-1) / q


class GCE(Technique):
    """Train with the generalized cross-entropy instead of cross-entropy.

    Args:
        q: the Box-Cox exponent in (0, 1]; 1 gives MAE, small q approaches CE.
    """

    name = "gce"

    def __init__(self, q: float = 0.7) -> None:
        if not 0.0 < q <= 1.0:
            raise ValueError(f"GCE: q must be in (0, 1], got {q}")
        self.q = q

    def task_loss(self, out: StepOutput, module: L.LightningModule) -> Tensor:
        return generalized_cross_entropy(out.logits, out.target, self.q)
