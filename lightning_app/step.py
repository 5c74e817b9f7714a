"""What one step of the step contract produces: :class:`StepOutput`, and the default task loss;
:class:`ForwardStep`, a module's step as a plain ``forward``, and :func:`forward_step_with`, that step
with other tensors in the module's place.

Kept apart from :mod:`reglab.mixins` (the module side of the contract) and
:mod:`reglab.technique` (the technique side) so that both import it and neither imports the other
the wrong way round.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reglab.kernels import soft_cross_entropy


@dataclass
class StepOutput:
    """What one forward pass produced, handed to every technique stage.

    Attributes:
        logits: ``(N, C)`` class scores.
        target: what the task loss is computed against: ``(N,)`` class indices, or ``(N, C)``
            probabilities once a target transform ran.
        labels: ``(N,)`` class indices as the data gave them; never transformed (defaults to
            ``target`` when that holds indices).
        features: ``(N, D)`` penultimate features, when the module has them.
        index: ``(N,)`` positions of the samples in the training set, when the data has them.
        batch: the batch the step ran on (after batch transforms).
        task_loss: ``(N,)`` per-sample task loss, filled by the step before loss terms run.
        extras: anything else a module or technique wants to pass along.
    """

    logits: Tensor
    target: Tensor
    labels: Tensor | None = None
    features: Tensor | None = None
    index: Tensor | None = None
    batch: dict[str, Any] = field(default_factory=dict)
    task_loss: Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.labels is None and self.target.dim() == 1:
            self.labels = self.target

    def detached(self) -> StepOutput:
        """A copy whose tensors are cut from the autograd graph (safe to keep after the step)."""

        def cut(value: Any) -> Any:
            if isinstance(value, Tensor):
                return value.detach()
            if isinstance(value, dict):
                return {k: cut(v) for k, v in value.items()}
            return value

        return dataclasses.replace(
            self, **{f.name: cut(getattr(self, f.name)) for f in dataclasses.fields(self)}
        )


def target_distribution(target: Tensor, num_classes: int) -> Tensor:
    """``(N, C)`` fp32 target probabilities: the one-hot of ``(N,)`` class indices, or soft targets
    (after a target transform) as they are. What the losses written over ``sum_c t_c ...`` take."""
    return F.one_hot(target, num_classes).float() if target.dim() == 1 else target.float()


def cross_entropy_per_sample(logits: Tensor, target: Tensor) -> Tensor:
    """Cross-entropy per sample for hard (``(N,)``) or soft (``(N, C)``) targets, in fp32.

    Soft targets (PS-KD, mixup, label smoothing) go through
    :func:`reglab.kernels.soft_cross_entropy`: the fused Triton kernel on GPU, the torch
    reference elsewhere; both count zero-target terms on masked (-inf) logits as 0.
    """
    if target.dim() == logits.dim():
        rows = soft_cross_entropy(logits.flatten(0, -2), target.flatten(0, -2), reduction="none")
        return rows.view(logits.shape[:-1])
    return F.cross_entropy(logits.float(), target, reduction="none")


class ForwardStep(nn.Module):
    """``forward(batch) = module.forward_step(batch)``: the step as a plain forward, so that
    :func:`torch.func.functional_call` runs it with other tensors in the module's place (Co-teaching's
    peer network, DR-Tune's pretrained copy), named ``module.<name>``."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, batch: dict[str, Any]) -> StepOutput:
        return self.module.forward_step(batch)


def forward_step_with(module: nn.Module, batch: dict[str, Any], tensors: dict[str, Tensor] | None = None) -> StepOutput:
    """``module.forward_step(batch)`` with the parameters and buffers named in ``tensors`` replaced
    (``torch.func.functional_call``) and every other buffer copied, so that this extra pass leaves
    the module's buffers (batch-norm running statistics) as they were."""
    stand_ins = {name: buffer.clone() for name, buffer in module.named_buffers()}
    stand_ins.update(tensors or {})
    return torch.func.functional_call(
        ForwardStep(module), {f"module.{name}": value for name, value in stand_ins.items()}, (batch,)
    )
