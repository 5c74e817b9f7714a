"""Feature distillation of paper 40 ("A Closer Look at Rehearsal-Free Continual Learning").

The model from the end of the previous task is the teacher; on the new task's inputs the
student's penultimate features are kept close to the teacher's:

    loss = CE + lam * mean_n mean_d (f_d(x_n) - f^teacher_d(x_n))^2

Unlike prediction distillation it constrains the representation, not the old head, so the head
can move freely. ``lam`` is a per-benchmark choice in the paper; the default is the one tuned on
split digits (``benchmarks/effects/lwf.yaml``, ``reglab bench effects``). In a plain single fit the term is 0.

Method card (what it does, when it helps, what it costs): ``feature_distillation.card.yaml`` beside this module.

Example:
    >>> from reglab.callbacks import FeatureDistillation
    >>> distil = FeatureDistillation(lam=1.0)
"""

from __future__ import annotations

from torch import Tensor

from reglab.callbacks.continual.teacher import PreviousModelDistillation
from reglab.mixins import StepOutput


def feature_distillation_loss(features: Tensor, teacher_features: Tensor) -> Tensor:
    """Mean squared difference of the two feature batches, in fp32."""
    return (features.float() - teacher_features.float()).pow(2).mean()


class FeatureDistillation(PreviousModelDistillation):
    """Keeps the features close to the previous model's (see the module docstring).

    Args:
        lam: weight of the distillation term.
    """

    name = "feature_distillation"

    needs = frozenset({"features"})

    def __init__(self, lam: float = 1.0) -> None:
        super().__init__(lam)

    def distillation(self, out: StepOutput, teacher_out: StepOutput) -> Tensor:
        return feature_distillation_loss(out.features, teacher_out.features)
