"""Core-tuning — contrast-regularized fine-tuning of contrastive self-supervised models
(Zhang, Hooi, Hu, Liang & Feng, NeurIPS 2021).

Fine-tuning a contrastively pretrained backbone, each batch's features ``f`` (B, D) are extended by
two sets of mixed features (hard pair mining), and the classifier and a supervised contrastive loss
both see all 3B:

* *hard negatives*: each feature mixed with a random partner of the batch,
  ``(1 - λ) f_i + λ f_π(i)`` with ``λ = max(Beta(α, α), 0.8)``;
* *hard positives*: each sample's hardest positive (the same-label feature of lowest cosine) mixed
  with its hardest negative (the other-label feature of highest cosine),
  ``λ f_p(i) + (1 - λ) f_n(i)`` with ``λ ~ Beta(α, α)``;
* *boundary smoothing*: the head is trained on all 3B features against the correspondingly mixed
  label distributions (soft cross-entropy, a mixup in feature space), the task loss;
* *contrastive regularization*: ``eta`` times a focal-weighted supervised contrastive loss
  (:func:`focal_supcon_loss`, temperature 0.07) on a two-layer projection head's L2-normalised
  outputs of the 3B features, positives being the features with the same label distribution.

Source: the official code (github.com/Vanint/Core-tuning, ``Core-tuning.py``), whose defaults are kept:
``eta = 0.1`` (its README's command), ``mixup_alpha = 1``, ``contrast_dim = 256``, temperature 0.07, the
0.8 floor, the projection head Linear(D, D)-ReLU-Linear(D, 256). As in that code, the batch's own
features enter the classification loss detached (only the mixed ones train the encoder through it),
the per-anchor contrastive sum is divided by all 3B columns and the loss by the number of anchors
that have a positive. Where this differs from it, and why:

* The code picks the hardest positive as the argmin of ``similarity * same-label mask``, whose masked
  entries are 0, so with non-negative features (ReLU backbones) the "hardest positive" is nearly
  always a masked entry — the first sample of another class, or the anchor itself — not a positive.
  Here it is the argmin over the same-label others (the paper's definition), the anchor itself when
  it has none; likewise the hardest negative is the argmax over the other labels only, the anchor
  itself when the batch has no other label.
* Random numbers come from torch's global generator (which reglab checkpoints, so a resumed run draws
  the same mixtures), not numpy's and Python's.
* The classification loss is returned per sample (the mean of sample i's three soft cross-entropies),
  whose mean is the code's mean over the 3B rows; so it is the task loss, and a technique that also
  replaces the task loss (focal loss, GCE) is refused at setup. Targets a target transform made soft
  (label smoothing) are mixed as they are.

The projection head is a submodule of the module (``core_tuning_projection``), added at setup, so it
is in the optimizer, the checkpoint and DDP's gradient sync; a checkpoint names a restore hook that
adds it to a bare module, so ``load_from_checkpoint`` works. Validation, test and prediction use the
head on the batch's features as usual.

Method card: ``core_tuning.card.yaml`` beside this module.

Example:
    >>> from reglab.callbacks import CoreTuning
    >>> core_tuning = CoreTuning(eta=0.1, mixup_alpha=1.0, pretrained_checkpoint=None)
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reglab.callbacks.domain_generalization._pretrained import linear_head, load_pretrained, parameter_counts
from reglab.checkpoints import add_restore_hook
from reglab.mixins import StepOutput
from reglab.step import cross_entropy_per_sample, target_distribution
from reglab.technique import Technique

PROJECTION = "core_tuning_projection"  # the projection head's attribute on the module: its checkpoint keys start with it
NEGATIVE_FLOOR = 0.8  # the official code's lower bound of the hard negatives' mixing weight


def hardest_pairs(features: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Per sample, the index of its hardest positive (same label, lowest cosine, not itself) and of
    its hardest negative (other label, highest cosine); the sample itself where there is none."""
    normalised = F.normalize(features.float(), dim=1)
    similarity = normalised @ normalised.T
    same = labels[:, None] == labels[None, :]
    others = same & ~torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    self_index = torch.arange(len(labels), device=labels.device)
    positive = similarity.masked_fill(~others, float("inf")).argmin(1)
    negative = similarity.masked_fill(same, float("-inf")).argmax(1)
    return torch.where(others.any(1), positive, self_index), torch.where((~same).any(1), negative, self_index)


def hard_pair_mixtures(features: Tensor, targets: Tensor, labels: Tensor, order: Tensor, lam_negative: Tensor,
                       lam_positive: Tensor) -> tuple[Tensor, Tensor]:
    """The 2B mixed features and label distributions (module docstring): hard negatives with the
    partners ``order`` and weights ``lam_negative`` (B,), then hard positives with ``lam_positive`` (B,)."""
    positive, negative = hardest_pairs(features.detach(), labels)
    lam_n, lam_p = lam_negative[:, None], lam_positive[:, None]
    mixed = torch.cat([(1 - lam_n) * features + lam_n * features[order],
                       lam_p * features[positive] + (1 - lam_p) * features[negative]])
    mixed_targets = torch.cat([(1 - lam_n) * targets + lam_n * targets[order],
                               lam_p * targets[positive] + (1 - lam_p) * targets[negative]])
    return mixed, mixed_targets


def focal_supcon_loss(embeddings: Tensor, groups: Tensor, temperature: float) -> Tensor:
    """The official focal supervised contrastive loss over L2-normalised ``embeddings`` (M, d):
    ``-(1/P) Σ_i (1/M) Σ_{j ∈ pos(i)} (1 - p_ij) log p_ij`` with ``p_ij`` the softmax of ``z_i.z_j / τ``
    over every ``j ≠ i``, positives the other rows of the same ``groups`` id, P the number of rows
    with a positive (0 when none has)."""
    z = embeddings.float()
    logits = z @ z.T / temperature
    not_self = ~torch.eye(len(z), dtype=torch.bool, device=z.device)
    log_prob = logits - torch.logsumexp(logits.masked_fill(~not_self, float("-inf")), dim=1, keepdim=True)
    positives = (groups[:, None] == groups[None, :]) & not_self
    weighted = torch.where(positives, (1 - log_prob.exp()) * log_prob, torch.zeros_like(log_prob))
    per_anchor = -weighted.sum(1) / len(z)
    return per_anchor.sum() / positives.any(1).sum().clamp_min(1)


def add_projection(module: nn.Module, width: int, contrast_dim: int) -> nn.Module:
    """Register ``module.core_tuning_projection`` (Linear(width, width)-ReLU-Linear(width, contrast_dim)),
    or return the one it has (a later fit of the same model, or a restored checkpoint)."""
    if not hasattr(module, PROJECTION):
        module.add_module(PROJECTION, nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, contrast_dim)))
    return getattr(module, PROJECTION)


def restore_projection(module: nn.Module, checkpoint: dict[str, Any]) -> None:
    """Restore hook (:func:`reglab.checkpoints.add_restore_hook`): a bare module gets the projection
    head, shaped as in the checkpoint, before the checkpoint's weights are loaded."""
    state = checkpoint["state_dict"]
    hidden, output = state[f"{PROJECTION}.0.weight"], state[f"{PROJECTION}.2.weight"]
    add_projection(module, hidden.shape[1], output.shape[0])


class CoreTuning(Technique):
    """Contrast-regularized fine-tuning with hard pair mining and boundary smoothing (module docstring).

    Args:
        eta: weight of the contrastive loss (official README: 0.1).
        mixup_alpha: α of the Beta distributions of the mixing weights (official: 1).
        contrast_dim: output width of the projection head (official: 256).
        temperature: of the contrastive loss (official: 0.07).
        pretrained_checkpoint: Lightning checkpoint (or state dict) of the same module to start from
            (a contrastively pretrained backbone); ``None`` = the module's weights as they are.
    """

    name = "core_tuning"
    needs = frozenset({"features"})

    def __init__(self, eta: float = 0.1, mixup_alpha: float = 1.0, contrast_dim: int = 256, temperature: float = 0.07,
                 pretrained_checkpoint: str | None = None) -> None:
        if eta < 0:
            raise ValueError(f"CoreTuning: eta must be >= 0, got {eta}")
        if mixup_alpha <= 0 or temperature <= 0:
            raise ValueError(f"CoreTuning: mixup_alpha and temperature must be > 0, got {mixup_alpha} and {temperature}")
        if contrast_dim < 1:
            raise ValueError(f"CoreTuning: contrast_dim must be >= 1, got {contrast_dim}")
        self.eta, self.mixup_alpha, self.contrast_dim, self.temperature = eta, mixup_alpha, contrast_dim, temperature
        self.pretrained_checkpoint = pretrained_checkpoint
        self.parameter_counts: dict[str, int] = {}
        self._mixed: tuple[StepOutput, Tensor, Tensor] | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        head = linear_head(self, pl_module, "it trains the head on mixed features")
        # once per module, before the projection head exists (the checkpoint has none); a later fit continues
        if stage == "fit" and self.pretrained_checkpoint and not hasattr(pl_module, PROJECTION):
            load_pretrained(self, pl_module, self.pretrained_checkpoint)
        # every stage: a checkpoint of this run holds the projection head, also for `reglab test`
        add_projection(pl_module, head.weight.shape[1], self.contrast_dim)
        self.parameter_counts = parameter_counts(pl_module)

    def mixtures(self, out: StepOutput) -> tuple[Tensor, Tensor]:
        """This step's 3B features (the batch's own detached, then the mixed) and label distributions,
        drawn once per step output (the task loss and the contrastive term share them)."""
        if self._mixed is None or self._mixed[0] is not out:
            features, size = out.features, len(out.features)
            targets = target_distribution(out.target, out.logits.shape[-1])
            beta = torch.distributions.Beta(torch.tensor(self.mixup_alpha), torch.tensor(self.mixup_alpha))
            order = torch.randperm(size, device=features.device)
            lam_negative = beta.sample((size,)).clamp_min(NEGATIVE_FLOOR).to(features.device)
            lam_positive = beta.sample((size,)).to(features.device)
            mixed, mixed_targets = hard_pair_mixtures(features.float(), targets, out.labels, order, lam_negative,
                                                      lam_positive)
            self._mixed = (out, torch.cat([features.detach().float(), mixed]), torch.cat([targets, mixed_targets]))
        return self._mixed[1], self._mixed[2]

    def task_loss(self, out: StepOutput, module: L.LightningModule) -> Tensor:
        features, targets = self.mixtures(out)
        logits = module.head(features.to(out.features.dtype))
        # sample i's three rows (its own, its hard negative, its hard positive): their mean per sample
        return cross_entropy_per_sample(logits, targets).view(3, -1).mean(0)

    def loss_terms(self, out: StepOutput, module: L.LightningModule) -> dict[str, Tensor]:
        features, targets = self.mixtures(out)
        embeddings = F.normalize(getattr(module, PROJECTION)(features.to(out.features.dtype)).float(), dim=1)
        groups = torch.unique(targets, dim=0, return_inverse=True)[1]
        self._mixed = None  # the step is done with them
        return {"contrastive": self.eta * focal_supcon_loss(embeddings, groups, self.temperature)}

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        add_restore_hook(checkpoint, "reglab.callbacks.domain_generalization.core_tuning:restore_projection")
