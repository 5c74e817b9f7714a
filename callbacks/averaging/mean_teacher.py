"""Mean teacher (Tarvainen & Valpola, NeurIPS 2017) as self-distillation — a baseline.

The teacher is an EMA of the student's weights (the same update as :class:`~reglab.callbacks.averaging.EMA`,
default d = 0.99, the paper's value during its ramp-up). Every training step adds the
temperature-scaled KL divergence from the teacher's prediction to the student's, on the same
batch:

    p_t = softmax(z_teacher / T),   p_s = softmax(z_student / T)
    loss = CE(z_student, y) + lambda * T^2 * mean_i KL(p_t,i || p_s,i)

The teacher's forward pass runs under ``no_grad`` in eval mode (no dropout, BatchNorm on the
teacher's own averaged statistics), with the teacher's weights swapped into the module without a
copy. The KL goes through :func:`reglab.kernels.soft_cross_entropy` (fused Triton kernel on
CUDA). The T^2 factor keeps the gradient's scale independent of T (Hinton et al., 2015).

Departures from the paper, on purpose: the paper's consistency cost is the squared error between
the two softmaxes with a sigmoid ramp-up of its weight, and both networks see differently
augmented inputs; here the cost is the KL that distillation uses, with no ramp-up (the EMA
warm-up already makes the teacher equal to the student at the start, so the term starts near
zero), on one view of the batch. Validation uses the student's weights; stack :class:`EMA` to
evaluate an average as well.

Method card (what it does, when it helps, what it costs): ``mean_teacher.card.yaml`` beside this module.

Example:
    >>> from reglab.callbacks import MeanTeacher
    >>> teacher = MeanTeacher(lam=1.0, temperature=1.0, decay=0.99)
"""

from __future__ import annotations

import lightning as L
from torch import Tensor

from reglab.callbacks.averaging.ema import EMA
from reglab.averaging import teacher_logits
from reglab.kernels import soft_cross_entropy
from reglab.mixins import StepOutput


def distillation_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """``T^2 * mean_i KL(softmax(teacher_i / T) || softmax(student_i / T))``, fp32, gradient
    through the student's logits only."""
    teacher_probs = (teacher_logits.detach().float() / temperature).softmax(-1)
    kl = soft_cross_entropy(student_logits, teacher_probs, temperature=temperature, subtract_target_entropy=True)
    return temperature**2 * kl


class MeanTeacher(EMA):
    """Self-distillation from an EMA teacher (formula in the module docstring).

    Args:
        lam: weight of the distillation term (lambda).
        temperature: softmax temperature T of both predictions.
        decay, warmup: of the teacher's EMA, as in :class:`EMA`.
    """

    name = "mean_teacher"

    evaluates_average = False

    def __init__(self, lam: float = 1.0, temperature: float = 1.0, decay: float = 0.99, warmup: bool = True) -> None:
        super().__init__(decay=decay, warmup=warmup)
        if lam < 0:
            raise ValueError(f"MeanTeacher: lam must be >= 0, got {lam}")
        if temperature <= 0:
            raise ValueError(f"MeanTeacher: temperature must be > 0, got {temperature}")
        self.lam = lam
        self.temperature = temperature

    def loss_terms(self, out: StepOutput, module: L.LightningModule) -> dict[str, Tensor]:
        teacher = teacher_logits(module, self.average, out.batch)
        return {"distillation": self.lam * distillation_kl(out.logits, teacher, self.temperature)}
