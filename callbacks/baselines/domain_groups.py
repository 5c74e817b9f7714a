"""What DomainBed's annealed penalty baselines (IRM, VREx, Fishr) share: a penalty weight that is
annealed in. Their per-domain groups come from :mod:`reglab.nn.domain_groups`.

DomainBed's IRM, VREx and Fishr weigh their penalty with a small weight for their first
``anneal_iters`` updates and with ``lambda`` afterwards, and re-create Adam at the update where
the weight jumps ("Adam doesn't like the sharp jump in gradient magnitudes"). :class:`AnnealedPenalty`
reads the update count from ``trainer.global_step`` (optimizer steps, which Lightning checkpoints),
so micro-batches of one accumulated step share one weight and a resumed run continues the
schedule exactly without state of its own; the reset empties the module's optimizer state in
``on_before_optimizer_step`` of update ``anneal_iters``, before that update is applied (a fresh
Adam with the same hyper-parameters, as DomainBed's).
"""

from __future__ import annotations

from typing import Any

import lightning as L
from torch import Tensor

from reglab.mixins import StepOutput
from reglab.technique import Technique


class AnnealedPenalty(Technique):
    """A per-domain penalty weighed ``initial_weight`` for the first ``anneal_iters`` optimizer steps
    and ``lam`` from then on, with the module's optimizer state emptied at the jump (DomainBed).

    Subclasses implement :meth:`penalty` (the unweighted penalty of one step's output); the term is
    logged as ``train/<name>/penalty``.
    """

    needs = frozenset({"domain"})
    initial_weight: float = 1.0

    def __init__(self, lam: float, anneal_iters: int) -> None:
        if lam < 0 or anneal_iters < 0:
            raise ValueError(f"{type(self).__name__}: lam and anneal_iters must be >= 0, got {lam} and {anneal_iters}")
        self.lam, self.anneal_iters = lam, anneal_iters

    def penalty(self, out: StepOutput, module: L.LightningModule) -> Tensor:
        raise NotImplementedError

    def penalty_weight(self, module: L.LightningModule) -> float:
        return self.lam if module.trainer.global_step >= self.anneal_iters else self.initial_weight

    def loss_terms(self, out: StepOutput, module: L.LightningModule) -> dict[str, Tensor]:
        return {"penalty": self.penalty_weight(module) * self.penalty(out, module)}

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        # at step 0 the state is empty anyway (DomainBed's Fishr skips that case explicitly)
        if trainer.global_step == self.anneal_iters:
            optimizer.state.clear()

