"""Fishr — invariant gradient variances across domains (Rame et al., ICML 2022; DomainBed's ``Fishr``).

The per-sample gradients of the cross-entropy with respect to the classifier head's weights and
bias have a variance in every training domain; Fishr pulls these variances together:

    v_d     = per-coordinate variance over domain d's samples of grad_head CE_i     (a vector of P)
    vbar_d  = (ema * m_d + (1 - ema) * v_d) / (1 - ema)     m_d: moving average of earlier steps' v_d
    penalty = mean_d mean_p (vbar_d - mean_d' vbar_d')_p^2
    loss    = task loss + w * penalty,   w = 0 for the first anneal_iters steps, lam after

Followed: DomainBed's ``Fishr`` (``domainbed/algorithms.py``: ``compute_fishr_penalty``,
``MovingAverage`` with ``oneminusema_correction``, ``l2_between_dicts``) and its defaults
``lambda = 1000``, ``penalty_anneal_iters = 1500``, ``ema = 0.95`` (``hparams_registry.py``), including
the optimizer reset where the weight jumps (:class:`~reglab.callbacks.baselines.domain_groups.AnnealedPenalty`).
DomainBed gets the per-sample gradients from BackPACK; for a linear head ``z = W f + b`` they have
a closed form — ``(p_i - t_i) f_i^T`` for ``W`` and ``p_i - t_i`` for ``b`` (``p`` the softmax of the
step's logits, ``t`` the target distribution) — and their variance needs no per-sample tensor:
``Var(g_c f_e) = mean(g_c^2 f_e^2) - mean(g_c f_e)^2``, two ``(C, D)`` matrix products per domain.
Gradients flow through ``p`` and ``f`` as through BackPACK's ``create_graph``. The head must be an
``nn.Linear`` on the step's features (``head`` names it); another head is refused at setup.

State: the moving averages ``m`` (one row per domain). Each optimizer step moves them once, with
the mean of that step's micro-batch variances (gradient accumulation keeps the time constant of
``ema`` in steps, as DomainBed's updates), averaged over DDP ranks first, so every rank holds the
same averages; a domain absent from a step keeps its average. The penalty of a micro-batch uses
the averages of the steps before it and its own variance. Like the accumulated gradients, the
variances of a step not yet taken are not checkpointed (Lightning saves between steps).

Method card: ``fishr.card.yaml`` beside this module.

Example:
    >>> from reglab.callbacks.baselines import Fishr
    >>> fishr = Fishr(lam=1000.0, anneal_iters=1500, ema=0.95)
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from reglab.callbacks.baselines.domain_groups import AnnealedPenalty
from reglab.mixins import StepOutput
from reglab.nn.domain_groups import domain_masks, group_means
from reglab.step import target_distribution


def head_gradient_variances(logits: Tensor, features: Tensor, target: Tensor, masks: Tensor, bias: bool = True) -> Tensor:
    """``(G, P)``: per domain, the variance over its samples of each coordinate of the per-sample
    cross-entropy gradient of a linear head (``W`` flattened row-major, then ``b`` if ``bias``)."""
    logits, features = logits.float(), features.float()
    slopes = logits.softmax(-1) - target_distribution(target, logits.shape[-1])
    counts = masks.sum(1).view(-1, 1, 1)
    mean = torch.einsum("gn,nc,nd->gcd", masks, slopes, features) / counts
    square = torch.einsum("gn,nc,nd->gcd", masks, slopes.pow(2), features.pow(2)) / counts
    variances = [(square - mean.pow(2)).flatten(1)]
    if bias:
        variances.append(group_means(masks, slopes.pow(2)) - group_means(masks, slopes).pow(2))
    return torch.cat(variances, 1)


def variance_distance(variances: Tensor) -> Tensor:
    """Mean over domains and coordinates of the squared distance to the domains' mean variance."""
    return (variances - variances.mean(0)).pow(2).mean()


class Fishr(AnnealedPenalty):
    """Matches the domains' head-gradient variances, annealed in (see the module docstring).

    Args:
        lam: penalty weight after the anneal (DomainBed's ``lambda``).
        anneal_iters: optimizer steps with weight 0 before ``lam`` applies (``penalty_anneal_iters``).
        ema: momentum of the per-domain moving average of the variances.
        head: name of the module's linear classifier head (applied to the step's features).
        num_domains: number of training-domain ids ``0 .. num_domains - 1`` (rows of the moving
            average); default the DataModule's ``num_train_domains``.
    """

    name = "fishr"
    needs = frozenset({"domain", "features"})
    stateful = True
    initial_weight = 0.0

    def __init__(self, lam: float = 1000.0, anneal_iters: int = 1500, ema: float = 0.95, head: str = "head",
                 num_domains: int | None = None) -> None:
        super().__init__(lam, anneal_iters)
        if not 0.0 <= ema < 1.0:
            raise ValueError(f"Fishr: ema must lie in [0, 1), got {ema}")
        self.ema, self.head, self.num_domains = ema, head, num_domains
        self.averages: Tensor | None = None
        self.pending: Tensor | None = None
        self.pending_count: Tensor | None = None
        self.bias = True

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        head = getattr(pl_module, self.head, None)
        if not isinstance(head, nn.Linear):
            raise self.fail(
                f"its per-sample gradients are those of a linear classifier head, and {type(pl_module).__name__}."
                f"{self.head} is {type(head).__name__}",
                "name the module's nn.Linear head in `head`, or use a module whose head is nn.Linear "
                "(ClassificationModule without cosine_head_temperature)",
            )
        self.bias = head.bias is not None
        domains = self.num_domains or getattr(trainer.datamodule, "num_train_domains", None)
        if not domains:
            raise self.fail("it keeps a moving average per training domain but cannot tell how many there are",
                            "use a DataModule with num_train_domains (DomainDigitsDataModule, RotatedDigitsDataModule) "
                            "or pass num_domains")
        self.num_domains = int(domains)
        size = head.weight.numel() + (head.out_features if self.bias else 0)
        self.pending, self.pending_count = torch.zeros(self.num_domains, size), torch.zeros(self.num_domains)
        fresh = torch.zeros(self.num_domains, size)
        self.averages = fresh if self.averages is None else self._fitting(self.averages, fresh)

    def penalty(self, out: StepOutput, module: L.LightningModule) -> Tensor:
        masks, ids = domain_masks(out.batch["domain"])
        if int(ids[-1]) >= self.num_domains:
            raise self.fail(f"the batch has domain id {int(ids[-1])} but num_domains={self.num_domains}",
                            "pass num_domains larger than every domain id")
        variances = head_gradient_variances(out.logits, out.features, out.target, masks, self.bias)
        self._to(variances.device)
        self.pending.index_add_(0, ids, variances.detach())
        self.pending_count.index_add_(0, ids, torch.ones_like(ids, dtype=self.pending_count.dtype))
        smoothed = (self.ema * self.averages[ids] + (1 - self.ema) * variances) / (1 - self.ema)
        return variance_distance(smoothed)

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        super().on_before_optimizer_step(trainer, pl_module, optimizer)
        pending = trainer.strategy.reduce(self.pending, reduce_op="sum")
        count = trainer.strategy.reduce(self.pending_count, reduce_op="sum")
        seen = count > 0
        self.averages[seen] = self.ema * self.averages[seen] + (1 - self.ema) * pending[seen] / count[seen].unsqueeze(1)
        self.pending.zero_()
        self.pending_count.zero_()

    def _to(self, device: torch.device) -> None:
        if self.averages.device != device:
            self.averages, self.pending, self.pending_count = (t.to(device) for t in (self.averages, self.pending, self.pending_count))

    def state_dict(self) -> dict[str, Any]:
        return {} if self.averages is None else {"averages": self.averages.cpu().clone()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict:
            averages = state_dict["averages"].clone()
            self.averages = averages if self.averages is None else self._fitting(averages, self.averages).to(self.averages.device)

    def _fitting(self, averages: Tensor, expected: Tensor) -> Tensor:
        if averages.shape != expected.shape:
            raise self.fail(f"its checkpointed moving average has shape {tuple(averages.shape)} but this model and "
                            f"data need {tuple(expected.shape)} (domains x head parameters)",
                            "resume with the same model, data and num_domains")
        return averages
