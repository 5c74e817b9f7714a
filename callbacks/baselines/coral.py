"""CORAL — Deep CORAL as DomainBed runs it: align the feature means and covariances of the training
domains (Sun & Saenko, ECCV-W 2016; DomainBed's ``CORAL``).

For every pair of training domains ``(i, j)`` present in the batch, on the penultimate features:

    penalty_ij = mean_d (mu_i - mu_j)_d^2 + mean_de (C_i - C_j)_de^2
    loss       = task loss + gamma * mean over pairs of penalty_ij

with ``mu`` a domain's feature mean and ``C`` its unbiased covariance (``n - 1``). Followed:
DomainBed's ``AbstractMMD`` with ``gaussian=False`` (``domainbed/algorithms.py``) and its default
``mmd_gamma = 1`` (``hparams_registry.py``). DomainBed's objective is the mean of the per-domain
cross-entropies; with the domain-balanced training loader that is the batch's mean task loss, which
the step contract already has, so CORAL adds only the penalty. Where it differs from the paper:
the paper's CORAL loss is ``||C_s - C_t||_F^2 / (4 d^2)`` between a source and a target domain;
DomainBed (and this) averages squared entries over every pair of training domains and adds the
mean difference. A domain with fewer than 2 samples in the batch has no covariance and is left out.

Method card: ``coral.card.yaml`` beside this module.

Example:
    >>> from reglab.callbacks.baselines import CORAL
    >>> coral = CORAL(gamma=1.0)   # Trainer(callbacks=[coral]) with a DataModule whose batches carry `domain`
"""

from __future__ import annotations

import lightning as L
import torch
from torch import Tensor

from reglab.mixins import StepOutput
from reglab.nn.domain_groups import domain_masks, group_means
from reglab.technique import Technique


def coral_penalty(features: Tensor, masks: Tensor) -> Tensor:
    """Mean over domain pairs of the squared mean and covariance differences (``(N, D)`` features,
    ``(G, N)`` domain masks of groups with at least 2 samples); 0 with fewer than 2 domains."""
    means = group_means(masks, features)
    centred = (features.unsqueeze(0) - means.unsqueeze(1)) * masks.unsqueeze(-1)
    covariances = torch.einsum("gnd,gne->gde", centred, centred) / (masks.sum(1) - 1).view(-1, 1, 1)
    first, second = torch.triu_indices(len(masks), len(masks), 1, device=features.device)
    mean_gap = (means[first] - means[second]).pow(2).mean(-1)
    covariance_gap = (covariances[first] - covariances[second]).pow(2).mean((-2, -1))
    return (mean_gap + covariance_gap).sum() / max(len(first), 1)


class CORAL(Technique):
    """``gamma`` times the CORAL distance between the training domains' features (module docstring).

    Args:
        gamma: weight of the penalty (DomainBed's ``mmd_gamma``).
    """

    name = "coral"
    needs = frozenset({"domain", "features"})

    def __init__(self, gamma: float = 1.0) -> None:
        if gamma < 0:
            raise ValueError(f"CORAL: gamma must be >= 0, got {gamma}")
        self.gamma = gamma

    def loss_terms(self, out: StepOutput, module: L.LightningModule) -> dict[str, Tensor]:
        masks, _ = domain_masks(out.batch["domain"], min_size=2)
        return {"penalty": self.gamma * coral_penalty(out.features.float(), masks)}
