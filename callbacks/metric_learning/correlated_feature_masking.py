"""SSL for recommendations: a contrastive item-tower loss over correlated feature masking (Yao et
al., "Self-supervised Learning for Large-scale Item Recommendations", CIKM 2021).

Multi-task training of a two-tower model (:class:`reglab.tasks.TwoTowerModule`): beside the main
task's in-batch softmax, a batch of items is encoded twice by the *same* item tower, each time with
a complementary half of its features masked (replaced by the tower's default embedding of that
field), and the two views of each item are pulled together against the other items' views:

    L_ssl = -1/N sum_i log( exp(<z_i, z'_i> / tau) / sum_j exp(<z_i, z'_j> / tau) )
    loss  = L_main + weight * L_ssl

Correlated feature masking (CFM) picks which half: the mutual information ``MI(V_a, V_b)`` of every
pair of item fields is computed once over the item corpus; per batch a seed field is drawn uniformly
and the ``n = round(mask_fraction * F)`` fields most informative about it (the seed among them)
are masked in the first view, the other ``F - n`` in the second, so a view cannot read a masked
field off a correlated one it keeps (``masking="random"`` draws the ``n`` fields at random: the
paper's random feature masking, RFM). The SSL items are drawn uniformly from the corpus without
replacement (``item_sampling="uniform"``), so tail items, rare in the main task's batches, get as
much of the SSL loss as head items; ``"batch"`` uses the main batch's items instead.

Source: the paper's method text (no official code is known); the full text could not be fetched in
this session, so the choices above follow the paper as its abstract and the issue describe it (the
multi-task loss with a shared item tower, masking by default embeddings, mutual-information
grouping) and are init args. A third-party implementation, LibRecommender's
``libreco/feature/ssl.py`` (read for its random masking), agrees where it overlaps: SSL items drawn
uniformly from the corpus without replacement, half the fields (``F // 2``) masked in one view and the
complementary half in the other, a masked field set to its default embedding. Not implemented: the paper's second augmentation, dropout of
multi-valued features (the generated data has none). Written by hand: pytorch-metric-learning's
NTXentLoss is symmetric over both views, the paper's loss is the one direction above.

Method card (what it does, when it helps, what it costs): ``correlated_feature_masking.card.yaml``.

Example:
    >>> from reglab.callbacks.metric_learning import CorrelatedFeatureMasking
    >>> cfm = CorrelatedFeatureMasking(weight=1.0, temperature=0.1)
    >>> mutual_information(torch.tensor([[0, 0], [1, 1], [0, 0], [1, 1]]))[0, 1].item() == math.log(2)
    True
"""

from __future__ import annotations

import math
from typing import Literal

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor

from reglab.mixins import StepOutput
from reglab.technique import Technique


def mutual_information(features: Tensor) -> Tensor:
    """``(F, F)`` mutual information (nats) between the columns of ``(N, F)`` categorical features,
    from their empirical joint distribution over the ``N`` rows."""
    codes = [torch.unique(column, return_inverse=True)[1] for column in features.T]
    sizes = [int(code.max()) + 1 for code in codes]
    information = torch.zeros(len(codes), len(codes), dtype=torch.float64)
    for a in range(len(codes)):
        for b in range(a, len(codes)):
            joint = torch.bincount(codes[a] * sizes[b] + codes[b], minlength=sizes[a] * sizes[b])
            joint = joint.view(sizes[a], sizes[b]).double() / len(features)
            independent = joint.sum(1, keepdim=True) * joint.sum(0, keepdim=True)
            seen = joint > 0
            information[a, b] = information[b, a] = (joint[seen] * (joint[seen] / independent[seen]).log()).sum()
    return information


def correlated_mask(information: Tensor, seed_field: int, num_masked: int) -> Tensor:
    """``(F,)`` bool: the ``num_masked`` fields with the highest mutual information with
    ``seed_field``, the seed itself first (its MI with itself, its entropy, is the largest)."""
    scores = information[seed_field].clone()
    scores[seed_field] = math.inf
    mask = torch.zeros(len(scores), dtype=torch.bool)
    mask[scores.topk(num_masked).indices] = True
    return mask


def view_contrastive_loss(first: Tensor, second: Tensor, temperature: float) -> Tensor:
    """Mean over ``i`` of ``-log softmax_j(<first_i, second_j> / temperature)`` at ``j = i``."""
    logits = first @ second.T / temperature
    return F.cross_entropy(logits.float(), torch.arange(len(first), device=first.device))


class CorrelatedFeatureMasking(Technique):
    """The multi-task SSL loss on the item tower with correlated feature masking (see the module docstring).

    Args:
        weight: ``alpha``, the weight of the SSL loss.
        temperature: ``tau`` of the SSL softmax.
        mask_fraction: share of the item fields masked in the first view (the rest in the second).
        masking: ``"correlated"`` (CFM) or ``"random"`` (RFM).
        item_sampling: ``"uniform"`` over the corpus, or ``"batch"`` (the main batch's items).
    """

    name = "correlated_feature_masking"

    def __init__(
        self,
        weight: float = 1.0,
        temperature: float = 0.1,
        mask_fraction: float = 0.5,
        masking: Literal["correlated", "random"] = "correlated",
        item_sampling: Literal["uniform", "batch"] = "uniform",
    ) -> None:
        if weight < 0 or temperature <= 0 or not 0 < mask_fraction < 1:
            raise ValueError(
                f"CorrelatedFeatureMasking: weight must be >= 0, temperature > 0 and mask_fraction in (0, 1), got "
                f"{weight}, {temperature}, {mask_fraction}."
            )
        if masking not in ("correlated", "random") or item_sampling not in ("uniform", "batch"):
            raise ValueError(
                f"CorrelatedFeatureMasking: masking is 'correlated' or 'random' and item_sampling 'uniform' or "
                f"'batch', got {masking!r}, {item_sampling!r}."
            )
        self.weight, self.temperature, self.mask_fraction = weight, temperature, mask_fraction
        self.masking, self.item_sampling = masking, item_sampling
        self.information: Tensor | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if not (hasattr(pl_module, "item_tower") and hasattr(pl_module, "item_table")):
            raise self.fail(
                f"{type(pl_module).__name__} has no item_tower / item_table to train with masked item features",
                "use it with a two-tower model (reglab.tasks.TwoTowerModule, e.g. configs/experiment/recsys_two_tower.yaml)",
            )
        if len(pl_module.item_table[0]) < 2:
            raise self.fail("the items have one feature, nothing to mask half of", "give the items two or more fields")

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # the module fills its corpus in its own setup, which Lightning runs after the callbacks'
        self.information = mutual_information(pl_module.item_table.cpu())

    def masks(self, num_fields: int) -> Tensor:
        """The first view's ``(F,)`` mask for one batch (the second view masks the rest)."""
        num_masked = min(max(1, round(self.mask_fraction * num_fields)), num_fields - 1)
        if self.masking == "random":
            mask = torch.zeros(num_fields, dtype=torch.bool)
            mask[torch.randperm(num_fields)[:num_masked]] = True
            return mask
        seed_field = int(torch.randint(num_fields, ()))
        return correlated_mask(self.information, seed_field, num_masked)

    def loss_terms(self, out: StepOutput, module: L.LightningModule) -> dict[str, Tensor]:
        table = module.item_table
        if self.item_sampling == "batch":
            items = out.batch["item_features"]
        else:
            count = min(len(out.batch["item_features"]), len(table))
            items = table[torch.randperm(len(table))[:count].to(table.device)]
        mask = self.masks(table.shape[1]).to(table.device)
        first, second = module.item_tower(items, mask), module.item_tower(items, ~mask)
        return {"ssl": self.weight * view_contrastive_loss(first, second, self.temperature)}
