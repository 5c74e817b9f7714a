"""The FLOPS-regularized sparse retriever: the baseline of inference-free sparse retrieval (no IDF, no distillation).

Paria et al., "Minimizing FLOPs to Learn Efficient Sparse Representations" (ICLR 2020), as SPLADE and
the official code of Geng et al. (2024, ``scripts/train/trainer.py``: ``flops_value``, ``get_lambda``)
use it on the passage side of an inference-free retriever: the loss adds
``λ_t · Σ_v (mean_i |p_iv|)²`` over the step's passage vectors (the positives and hard negatives of
:class:`reglab.tasks.SparseRetrievalModule`), ``λ_t`` growing quadratically to ``weight`` over
``warmup_steps`` optimizer steps (the official defaults are 1e-3 over 10,000 steps; a miniature fit
has tens of steps). Queries are bags of their word pieces, all weighted 1. Written by hand: no
library has a FLOPS loss for a Lightning model (sentence-transformers' SpladeLoss wraps its own model).

Example:
    >>> regularizer = FLOPSRegularizer(weight=1e-3, warmup_steps=20)
    >>> regularizer.name
    'flops_regularizer'
"""

from __future__ import annotations

import lightning as L
from torch import Tensor

from reglab.mixins import StepOutput
from reglab.tasks.sparse_retrieval import check_sparse_retriever, flops_penalty, flops_schedule
from reglab.technique import Technique


class FLOPSRegularizer(Technique):
    """``weight``-scaled FLOPS penalty on the passage vectors, quadratically warmed up (module docstring).

    Args:
        weight: ``λ`` after the warm-up; a larger one gives sparser passages.
        warmup_steps: optimizer steps over which ``λ`` grows as ``(step / warmup_steps)²``.
    """

    name = "flops_regularizer"

    def __init__(self, weight: float = 1e-3, warmup_steps: int = 20) -> None:
        if weight < 0 or warmup_steps < 0:
            raise ValueError(f"FLOPSRegularizer: weight and warmup_steps must be >= 0, got {weight}, {warmup_steps}.")
        self.weight, self.warmup_steps = weight, warmup_steps

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        check_sparse_retriever(self, pl_module)

    def loss_terms(self, out: StepOutput, module: L.LightningModule) -> dict[str, Tensor]:
        weight = flops_schedule(self.weight, self.warmup_steps, module.trainer.global_step)
        return {"flops": weight * flops_penalty(out.extras["passage_vectors"].float())}
