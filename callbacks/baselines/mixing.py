"""The shared core of the batch-mixing baselines (Mixup, CutMix).

Both pair every sample of a batch with a partner from a random permutation of the same batch,
blend the two inputs, and blend the two targets with the share ``lam`` the sample keeps:

    lam     ~ Beta(alpha, alpha)                 (CutMix then corrects it to the pasted box)
    x_mixed = blend(x, x[perm], lam)             (Mixup: a convex combination; CutMix: a box)
    t_mixed = lam * t + (1 - lam) * t[perm]      (t: one-hot labels or soft targets)

Cross-entropy against ``t_mixed`` equals the official codes' ``lam * CE(y) + (1 - lam) *
CE(y[perm])``, since cross-entropy is linear in the target, and it lets the mixing compose with
other target transforms. Smoothing is affine, so LabelSmoothing gives the same targets before or
after a mixing technique; techniques whose targets depend on the sample (PS-KD) go *before* the
mixing technique in the config, so that their per-sample targets are mixed too.

:class:`BatchMixing` is the Technique both baselines subclass: the batch transform draws the
mixing (with the global torch RNG, whose state the step contract saves in checkpoints, so a
resumed run mixes exactly as an uninterrupted one), records it in the batch, and the target
transform reads it back. Subclasses only say how two inputs are blended.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor

from reglab.mixins import StepOutput
from reglab.technique import Technique


@dataclass(frozen=True)
class MixingPlan:
    """How one batch was mixed: sample ``i`` was blended with sample ``permutation[i]`` and
    keeps the share ``lam`` of its own target."""

    permutation: Tensor
    lam: float


def sample_mixing_share(alpha: float) -> float:
    """``lam ~ Beta(alpha, alpha)``, drawn from the global torch RNG."""
    concentration = torch.tensor(float(alpha))
    return float(torch.distributions.Beta(concentration, concentration).sample())


def mix_targets(target: Tensor, num_classes: int, plan: MixingPlan) -> Tensor:
    """``lam * t + (1 - lam) * t[perm]`` as ``(N, C)`` probabilities (``t`` one-hot for indices)."""
    probs = F.one_hot(target, num_classes).float() if target.dim() == 1 else target.float()
    return plan.lam * probs + (1.0 - plan.lam) * probs[plan.permutation]


class BatchMixing(Technique):
    """Pairs each sample with a partner of the same batch and mixes inputs and targets.

    Subclasses implement :meth:`blend_inputs`. The plan is stored in the batch under
    ``<name>_plan`` so that the target transform of the same step (and any later technique) can
    read it from ``out.batch``.

    Args:
        alpha: the Beta(alpha, alpha) concentration of the mixing share.
        probability: chance that a batch is mixed at all; unmixed batches keep their targets.
    """

    def __init__(self, alpha: float = 1.0, probability: float = 1.0) -> None:
        if alpha <= 0:
            raise ValueError(f"{type(self).__name__}: alpha must be > 0, got {alpha}")
        if not 0.0 <= probability <= 1.0:
            raise ValueError(f"{type(self).__name__}: probability must be in [0, 1], got {probability}")
        self.alpha = alpha
        self.probability = probability

    @property
    def plan_key(self) -> str:
        return f"{self.name}_plan"

    def blend_inputs(self, inputs: Tensor, permutation: Tensor, lam: float) -> tuple[Tensor, float]:
        """Blend ``inputs`` with ``inputs[permutation]``; return them and the share actually kept."""
        raise NotImplementedError

    def transform_batch(self, batch: dict[str, Any], module: L.LightningModule) -> dict[str, Any]:
        # Drawn only below 1 so that an always-on technique consumes exactly one Beta draw and one
        # permutation per batch, as the official Mixup code does.
        if self.probability < 1.0 and float(torch.rand(())) >= self.probability:
            return batch
        inputs = batch["input"]
        if not torch.is_tensor(inputs) or not inputs.is_floating_point():
            raise self.fail(
                f"it blends inputs, but the batch's `input` is {type(inputs).__name__}"
                + (f" of dtype {inputs.dtype}" if torch.is_tensor(inputs) else ""),
                "use it with continuous inputs (images, features), not token ids",
            )
        permutation = torch.randperm(len(inputs)).to(inputs.device)
        mixed, lam = self.blend_inputs(inputs, permutation, sample_mixing_share(self.alpha))
        return {**batch, "input": mixed, self.plan_key: MixingPlan(permutation, lam)}

    def transform_targets(self, out: StepOutput, module: L.LightningModule) -> Tensor:
        plan = out.batch.get(self.plan_key)
        if plan is None:
            return out.target
        return mix_targets(out.target, out.logits.shape[-1], plan)
