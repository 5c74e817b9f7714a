"""VREx — variance risk extrapolation as DomainBed runs it (Krueger et al., ICML 2021; DomainBed's ``VREx``).

    R_d     = mean task loss of domain d's samples in the batch
    penalty = mean_d (R_d - mean_d' R_d')^2          (the variance of the domain risks)
    loss    = task loss + w * penalty,   w = 1 for the first anneal_iters steps, lam after

Followed: DomainBed's ``VREx.update`` (``domainbed/algorithms.py``) with its defaults
``vrex_lambda = 10``, ``vrex_penalty_anneal_iters = 500`` (``hparams_registry.py``), and its reset
of the optimizer at the step where the weight jumps
(:class:`~reglab.callbacks.baselines.domain_groups.AnnealedPenalty`). The risks are the step's
per-sample task loss (so VREx composes with a technique that replaces cross-entropy); DomainBed's
``mean_d R_d`` is the batch's mean task loss under the domain-balanced loader, so only the variance
is added. The paper's V-REx is the same penalty (its ``beta``).

Method card: ``vrex.card.yaml`` beside this module.

Example:
    >>> from reglab.callbacks.baselines import VREx
    >>> vrex = VREx(lam=10.0, anneal_iters=500)
"""

from __future__ import annotations

import lightning as L
from torch import Tensor

from reglab.callbacks.baselines.domain_groups import AnnealedPenalty
from reglab.mixins import StepOutput
from reglab.nn.domain_groups import domain_masks, group_means


def risk_variance(losses: Tensor, masks: Tensor) -> Tensor:
    """Population variance of the per-domain mean losses (``(N,)`` losses, ``(G, N)`` masks)."""
    risks = group_means(masks, losses.float())
    return (risks - risks.mean()).pow(2).mean()


class VREx(AnnealedPenalty):
    """The variance of the training domains' risks, annealed in (see the module docstring).

    Args:
        lam: penalty weight after the anneal (DomainBed's ``vrex_lambda``).
        anneal_iters: optimizer steps with weight 1 before ``lam`` applies (``vrex_penalty_anneal_iters``).
    """

    name = "vrex"

    def __init__(self, lam: float = 10.0, anneal_iters: int = 500) -> None:
        super().__init__(lam, anneal_iters)

    def penalty(self, out: StepOutput, module: L.LightningModule) -> Tensor:
        return risk_variance(out.task_loss, domain_masks(out.batch["domain"])[0])
