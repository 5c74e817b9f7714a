"""IRM — invariant risk minimization, IRMv1 as DomainBed runs it (Arjovsky et al., 2019; DomainBed's ``IRM``).

The penalty is the squared gradient of each domain's risk with respect to a dummy scale ``s`` on
the logits, at ``s = 1``, estimated without bias from two halves of the domain's samples:

    penalty_d = dR_d^even/ds * dR_d^odd/ds          R(s) = mean cross-entropy of s * logits
    loss      = task loss + w * mean_d penalty_d,   w = 1 for the first anneal_iters steps, lam after

Followed: DomainBed's ``IRM._irm_penalty`` and ``update`` (``domainbed/algorithms.py``), the halves
being the even and odd positions of the domain's samples in the batch, and its defaults
``irm_lambda = 100``, ``irm_penalty_anneal_iters = 500`` (``hparams_registry.py``); the optimizer's
state is emptied at the step where the weight jumps, as DomainBed re-creates Adam there
(:class:`~reglab.callbacks.baselines.domain_groups.AnnealedPenalty`). DomainBed takes the derivative
with autograd and a double backward; for cross-entropy it has the closed form

    d CE(s z, t)/ds at s = 1  =  sum_k (softmax(z)_k - t_k) z_k

which is what is computed here (one backward; soft targets work the same way). So the penalty is
IRMv1's with cross-entropy whatever task loss the module or another technique uses. DomainBed's
nll is the mean of the per-domain risks, which is the batch's mean task loss under the
domain-balanced loader. A domain with fewer than 2 samples in the batch has no two halves and is
left out.

Method card: ``irm.card.yaml`` beside this module.

Example:
    >>> from reglab.callbacks.baselines import IRM
    >>> irm = IRM(lam=100.0, anneal_iters=500)
"""

from __future__ import annotations

import lightning as L
import torch
from torch import Tensor

from reglab.callbacks.baselines.domain_groups import AnnealedPenalty
from reglab.mixins import StepOutput
from reglab.nn.domain_groups import domain_masks
from reglab.step import target_distribution


def scale_gradients(logits: Tensor, target: Tensor) -> Tensor:
    """``(N,)``: each sample's d CE(s * logits, target)/ds at s = 1 (classes masked to -inf add 0)."""
    logits = logits.float()
    slope = (logits.softmax(-1) - target_distribution(target, logits.shape[-1])) * logits
    return torch.where(torch.isfinite(logits), slope, 0.0).sum(-1)


def irm_penalty(slopes: Tensor, masks: Tensor) -> Tensor:
    """Mean over domains of (mean slope of the even samples) x (mean slope of the odd samples),
    positions counted within each domain (``(G, N)`` masks of groups with at least 2 samples)."""
    position = (masks.cumsum(1) * masks).sum(0) - 1
    even = masks * (position % 2 == 0)
    odd = masks - even
    return ((even @ slopes) / even.sum(1) * (odd @ slopes) / odd.sum(1)).sum() / max(len(masks), 1)


class IRM(AnnealedPenalty):
    """IRMv1's penalty, annealed in (see the module docstring).

    Args:
        lam: penalty weight after the anneal (DomainBed's ``irm_lambda``).
        anneal_iters: optimizer steps with weight 1 before ``lam`` applies (``irm_penalty_anneal_iters``).
    """

    name = "irm"

    def __init__(self, lam: float = 100.0, anneal_iters: int = 500) -> None:
        super().__init__(lam, anneal_iters)

    def penalty(self, out: StepOutput, module: L.LightningModule) -> Tensor:
        masks, _ = domain_masks(out.batch["domain"], min_size=2)
        return irm_penalty(scale_gradients(out.logits, out.target), masks)
