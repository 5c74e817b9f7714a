"""LwF — learning without forgetting (Li & Hoiem 2016): prediction distillation of paper 40.

The model from the end of the previous task is the teacher. On the new task's inputs the
student's predictions over the *old* classes are kept close to the teacher's, with temperature T:

    q = softmax(z_teacher[old] / T),   p = softmax(z[old] / T)
    loss = CE + lam * T^2 * mean_n KL(q_n || p_n)

Defaults from the LwF paper: T = 2, lam = 1 (its lambda_o). The T^2 factor keeps the gradient
scale independent of T (Hinton et al.). In a plain single fit (no task has ended) the term is 0.

Method card (what it does, when it helps, what it costs): ``lwf.card.yaml`` beside this module.

Example:
    >>> from reglab.callbacks import LwF
    >>> lwf = LwF(temperature=2.0, lam=1.0)
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from reglab.callbacks.continual.teacher import PreviousModelDistillation
from reglab.mixins import StepOutput


def prediction_distillation(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """``T^2 * mean_n KL(softmax(teacher/T) || softmax(student/T))`` in fp32."""
    log_student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl = (log_teacher.exp() * (log_teacher - log_student)).sum(-1)
    return temperature**2 * kl.mean()


class LwF(PreviousModelDistillation):
    """Distils the previous model's predictions over the old classes (see the module docstring).

    Args:
        temperature: softmax temperature T of both predictions.
        lam: weight of the distillation term.
    """

    name = "lwf"

    def __init__(self, temperature: float = 2.0, lam: float = 1.0) -> None:
        super().__init__(lam)
        if temperature <= 0:
            raise ValueError(f"LwF: temperature must be > 0, got {temperature}")
        self.temperature = temperature

    def distillation(self, out: StepOutput, teacher_out: StepOutput) -> Tensor:
        old = self.old_classes.to(out.logits.device) if self.old_classes is not None else slice(None)
        return prediction_distillation(out.logits[:, old], teacher_out.logits[:, old], self.temperature)
