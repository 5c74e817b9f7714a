"""MVP — Mask and Visual Prompt tuning for the Si-Blurry online stream (Moon et al., ICCV 2023;
official code KHU-AGI/Si-Blurry, ``methods/mvp.py``), its three model-agnostic parts.

With ``z`` the logits, ``f`` the penultimate features, ``W, b`` the linear head, ``y_i`` the label
of sample i, ``p_i = softmax(z_i)`` and ``t_i`` its target (one-hot, or soft from a partner):

* **Instance-wise logit masking** — logits of classes absent from the current batch are masked
  (−inf) during training, so an online step never pushes down classes it has no samples of:
  ``z_ic ← −inf`` for ``c ∉ {y_j}``.
* **Gradient-similarity focal loss (GSF)** — the gradient of sample i's cross-entropy on its own
  class's head row, ``g_i = (p_{i,y_i} − t_{i,y_i}) f_i``, is compared with the batch's gradient
  on that row, ``G_c = (1/B) Σ_j (p_jc − t_jc) f_j``; the *ignorance score*
  ``s_i = 1 − cos(g_i, G_{y_i})`` is large for samples the batch gradient ignores (minority
  classes, hard samples), and each sample's loss is
  ``ℓ_i = ((1 − α) + α s_i^γ) · CE(ẑ_i, t_i)``  (α = 0.5, γ = 2).
* **Adaptive feature scaling (AFS)** — the *compensation score* ``c_i = 1 − cos(W_{y_i}, f_i) + margin``
  (margin 0.5) divides the features before the head: ``ẑ_i = W f_i / c_i + b``. A sample far from
  its class weight gets damped logits, hence a smaller softmax saturation and a larger gradient;
  one already aligned with it is scaled up and saturates.

Both scores are computed without gradient, from the masked logits before scaling (as the official
code does); the GSF gradients are in closed form for a linear head (checked against autograd in
tests/test_mvp.py), so no per-sample backward pass is needed.

Where this departs from the paper or its code, and why:
    * GSF per sample, as the paper states it. The official code multiplies each sample's weight
      by the *batch-mean* cross-entropy (``F.nll_loss`` reduces before the weighting), so there the
      weights only rescale the whole batch loss; here they weight each sample's own loss.
    * The paper learns one soft class mask per prompt key (``2·sigmoid(M_k)``) and picks it per
      instance by key–query matching on a frozen pretrained ViT, and multiplies the logits by it
      at inference too. A plain backbone has no prompt keys and no frozen query encoder, so this
      keeps what the mask is for — "discern the classes to be learned in the current batch"
      (the paper's abstract) — as a hard mask of the classes present in the batch, during
      training only. The contrastive visual prompt tuning loss is not built (no prompts).
    * Soft targets (a label-smoothing partner) are renormalised over the classes left unmasked.

Method card:
    what it does: trains online on the present classes only, up-weights the samples the batch
        gradient ignores and rescales features by how far they are from their class weight;
    when it helps: online class-incremental streams with blurry boundaries and class imbalance
        (Si-Blurry), without replay;
    what it costs: a few (B, C) and (C, D) products per step; no state.

Example:
    >>> import torch
    >>> from reglab.callbacks import MVP
    >>> mvp = MVP(alpha=0.5, gamma=2.0, margin=0.5)
    >>> ignorance_scores(torch.tensor([[0.7, 0.3], [0.2, 0.8]]), torch.eye(2), torch.tensor([0, 1]), torch.eye(2))
    tensor([0.1679, 0.4453])
"""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reglab.mixins import StepOutput
from reglab.technique import Technique


def mask_absent_classes(logits: Tensor, labels: Tensor) -> Tensor:
    """Logits with the classes that no sample of the batch is labelled with set to −inf."""
    present = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
    present[labels] = True
    return logits.masked_fill(~present, float("-inf"))


def ignorance_scores(probs: Tensor, targets: Tensor, labels: Tensor, features: Tensor) -> Tensor:
    """``s_i = 1 − cos(g_i, G_{y_i})`` for a linear head (see the module docstring); ``(B,)``.

    ``probs`` and ``targets`` are ``(B, C)``, ``features`` ``(B, D)``.
    """
    logit_grads = probs - targets                                       # dCE_i / dz_i
    rows = torch.arange(len(labels), device=labels.device)
    sample_grads = logit_grads[rows, labels].unsqueeze(-1) * features   # d CE_i / d W_{y_i}
    batch_grads = logit_grads.T @ features / len(labels)                # d mean CE / d W, (C, D)
    return 1.0 - F.cosine_similarity(sample_grads, batch_grads[labels], dim=-1)


def compensation_scores(weight: Tensor, labels: Tensor, features: Tensor, margin: float) -> Tensor:
    """``c_i = 1 − cos(W_{y_i}, f_i) + margin``; ``(B,)``."""
    return 1.0 - F.cosine_similarity(weight[labels], features, dim=-1) + margin


def scaled_feature_logits(logits: Tensor, bias: Tensor | None, scale: Tensor) -> Tensor:
    """``W f / c + b`` from ``z = W f + b`` (masked entries stay −inf since ``c > 0``)."""
    if bias is None:
        return logits / scale.unsqueeze(-1)
    return (logits - bias) / scale.unsqueeze(-1) + bias


def unmasked_targets(targets: Tensor, logits: Tensor) -> Tensor:
    """``(B, C)`` targets with the mass on −inf (masked) classes dropped and the rest renormalised."""
    targets = targets.masked_fill(~torch.isfinite(logits), 0.0)
    return targets / targets.sum(-1, keepdim=True).clamp_min(1e-12)


def masked_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Per-sample CE against ``(B, C)`` targets that put no mass on −inf (masked) classes."""
    log_probs = F.log_softmax(logits, dim=-1).masked_fill(~torch.isfinite(logits), 0.0)
    return -(targets * log_probs).sum(-1)


class MVP(Technique):
    """Instance-wise logit masking, gradient-similarity focal loss, adaptive feature scaling.

    Args:
        alpha: weight of the ignorance-score term in the focal weight ``(1 − α) + α s^γ`` (0: plain CE).
        gamma: focusing exponent of the ignorance score.
        margin: added to ``1 − cos(W_y, f)`` in the compensation score; must be > 0.
        instance_mask: mask the logits of classes absent from the batch during training.
        feature_scaling: divide the features by the compensation score before the head (AFS).
    """

    name = "mvp"
    fsdp_unsupported = "it reads the head's weight directly (not through its forward), and FSDP may hold only this rank's shard of it"

    needs = frozenset({"features"})

    def __init__(self, alpha: float = 0.5, gamma: float = 2.0, margin: float = 0.5,
                 instance_mask: bool = True, feature_scaling: bool = True) -> None:
        if not 0.0 <= alpha <= 1.0:
            raise self.fail(f"alpha must lie in [0, 1], got {alpha}", "use the paper's 0.5, or 0 to turn GSF off")
        if gamma < 0:
            raise self.fail(f"gamma must be ≥ 0, got {gamma}", "use the paper's 2.0")
        if margin <= 0:
            raise self.fail(f"margin must be > 0 (it keeps the feature scale finite), got {margin}",
                            "use the paper's 0.5")
        self.alpha, self.gamma, self.margin = alpha, gamma, margin
        self.instance_mask, self.feature_scaling = instance_mask, feature_scaling

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit" and not isinstance(getattr(pl_module, "head", None), nn.Linear):
            raise self.fail(
                f"it needs the classifier head as an nn.Linear `head` attribute, and {type(pl_module).__name__} has "
                f"{type(getattr(pl_module, 'head', None)).__name__}",
                "use reglab.tasks.ClassificationModule with a backbone that has no head of its own",
            )

    def transform_outputs(self, out: StepOutput, module: L.LightningModule) -> StepOutput:
        if self.instance_mask:
            out.logits = mask_absent_classes(out.logits, self._labels(out))
        return out

    def task_loss(self, out: StepOutput, module: L.LightningModule) -> Tensor:
        labels, logits, features = self._labels(out), out.logits.float(), out.features.float()
        if features.shape[-1] != module.head.in_features:
            raise self.fail(
                f"the step's features have {features.shape[-1]} dimensions but the head takes {module.head.in_features}",
                "return the head's input as StepOutput.features",
            )
        targets = out.target.float() if out.target.dim() == 2 else F.one_hot(out.target, logits.shape[-1]).float()
        targets = unmasked_targets(targets, logits)
        if self.feature_scaling:
            weight = module.head.weight.detach().float()
            scale = compensation_scores(weight, labels, features.detach(), self.margin)
            bias = None if module.head.bias is None else module.head.bias.float()
            scaled = scaled_feature_logits(logits, bias, scale)
        else:
            scaled = logits
        loss = masked_cross_entropy(scaled, targets)
        if self.alpha == 0.0:
            return loss
        with torch.no_grad():
            scores = ignorance_scores(logits.softmax(-1), targets, labels, features)
        return ((1.0 - self.alpha) + self.alpha * scores.pow(self.gamma)) * loss

    def _labels(self, out: StepOutput) -> Tensor:
        if out.labels is None:
            raise self.fail("it needs the hard class labels of the batch and the step has none",
                            "keep StepOutput.labels (reglab modules set it from the batch's target)")
        return out.labels
