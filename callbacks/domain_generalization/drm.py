"""DRM — domain-specific risk minimization (Zhang, Wang, Liang, Zhang, Wang, Jin & Tan, KDD 2023).

Training: beside the module's own head ``h_0`` (the shared one, trained on every domain), ``K``
domain-specific heads ``h_1 .. h_K`` on the same features, head ``h_k`` trained on domain ``k``'s
samples only (``batch["domain"]``)::

    loss = mean_i CE(h_0(f_i), y_i) + weight * mean_i CE(h_{d_i}(f_i), y_i)

Inference (online model steering): for each test sample the ``K + 1`` heads' predictions are
weighed by their entropy ``H_k(x)`` (a confident head is taken to fit the sample's domain)::

    p(y|x) = sum_k w_k(x) softmax(h_k(f(x))),   w_k(x) = H_k(x)^-gamma / sum_j H_j(x)^-gamma

``gamma = 0`` is the plain average, a large ``gamma`` the most confident head; ``gamma < 0`` takes
the lowest-entropy head per sample (the official code's convention).

**Where the steering happens.** The heads are a submodule of the LightningModule
(``module.drm_heads``, so they are in its optimizer, checkpoint, device moves and DDP sync, added at
setup before the optimizers exist), and a forward hook on ``module.head`` replaces the head's output
in evaluation mode by the log of the steered mixture. Every evaluation loop therefore predicts with
it — Lightning's validate / test / predict, ``module(x)``, or a loop of the user's — without a hook of
the step contract, and the eval loss is the mixture's negative log-likelihood. In training mode the
head's output is untouched. A checkpoint names a restore hook, so
``ClassificationModule.load_from_checkpoint`` rebuilds the heads and the steering before loading;
a DRM attached to a later ``test`` sets its own ``gamma`` (steering is a choice made at test time).

Source followed: the official code, ``yfzhang114/AdaNPC`` (``domainbed/algorithms.py`` class ``DRM``:
training; ``domainbed/adapt_algorithms.py`` ``DRM`` / ``DRMFull`` with ``label="drm"``: the entropy
weighting). Where this differs:

* the official loss is ``(CE(h_{d}) + CE(h_0)) / 2`` per domain, averaged over domains; here the
  shared head's CE is the step contract's task loss and the domain heads' CE a loss term of the same
  weight 1, so the total is twice the official one (same direction; Adam is insensitive to the scale).
  With domain-balanced batches (DomainBed's one minibatch per domain) the per-sample mean equals the
  official mean over domains.
* the official mixture sums the weighted predictions of the ``K`` domain heads only, while normalising
  the weights over all ``K + 1`` heads; here the shared head's term is in the sum too, so the weights of
  the mixture add up to 1.
* the official adaptation script also fine-tunes the heads on confident pseudo-labels at test time
  and picks ``gamma`` (swept over -1, 0, 0.5, 1, 5) and the other adaptation settings on the test
  domain. Neither is done here: the model is never changed by evaluation, and ``gamma = 1`` is fixed
  beforehand (the middle of the official sweep).
* the official training-time ``predict`` (``lf_alg="entropy"``) takes the one head of lowest mean
  entropy over the test batch; the paper's online steering, per arriving sample, is what is built.

Logs ``train/drm/domain_heads`` (weighted).

Method card (what it does, when it helps, what it costs): ``drm.card.yaml`` beside this module.

Example:
    >>> import torch
    >>> logits = torch.tensor([[[2.0, 0.0]], [[0.0, 0.0]]])   # 2 heads, 1 sample, 2 classes
    >>> steered_log_probs(logits, gamma=0.0).exp()            # gamma 0: the plain average
    tensor([[0.6904, 0.3096]])
"""

from __future__ import annotations

import copy
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from reglab.checkpoints import add_restore_hook
from reglab.mixins import StepOutput
from reglab.step import cross_entropy_per_sample
from reglab.technique import Technique

HEADS = "drm_heads"  # the heads' attribute on the module: their checkpoint keys start with it
CHECKPOINT_KEY = "reglab_drm"  # what the restore hook needs to rebuild them: the number of heads, gamma


def steered_log_probs(logits: Tensor, gamma: float) -> Tensor:
    """``(N, C)`` log of the entropy-weighted mixture of ``(H, N, C)`` heads' predictions, in fp32:
    weights ``H_k^-gamma`` normalised over the heads per sample, or (``gamma < 0``) the
    lowest-entropy head per sample."""
    log_probs = logits.float().log_softmax(-1)
    entropy = -torch.special.xlogy(log_probs.exp(), log_probs.exp()).sum(-1)  # (H, N); 0 log 0 = 0
    if gamma < 0:
        return log_probs[entropy.argmin(0), torch.arange(log_probs.shape[1], device=logits.device)]
    weights = entropy.clamp_min(torch.finfo(entropy.dtype).tiny).pow(-gamma)
    weights = weights / weights.sum(0, keepdim=True)
    return torch.logsumexp(log_probs + weights.log().unsqueeze(-1), dim=0)


class DomainHeads(nn.Module):
    """``num_domains`` freshly initialised copies of a head, and the steering of that head's output."""

    def __init__(self, head: nn.Module, num_domains: int, gamma: float) -> None:
        super().__init__()
        self.heads = nn.ModuleList(copy.deepcopy(head) for _ in range(num_domains))
        for layer in self.heads.modules():
            if callable(getattr(layer, "reset_parameters", None)):
                layer.reset_parameters()
        self.gamma = gamma

    def forward(self, features: Tensor) -> Tensor:
        """``(K, N, C)``: every domain head's logits."""
        return torch.stack([head(features) for head in self.heads])

    def steer(self, head: nn.Module, inputs: tuple[Any, ...], output: Tensor) -> Tensor | None:
        """Forward hook of the module's head: in evaluation mode, its output becomes the log of the
        steered mixture of all heads (itself last); in training mode it is left alone."""
        if head.training:
            return None
        return steered_log_probs(torch.cat([self(inputs[0]), output.unsqueeze(0)]), self.gamma)


def add_heads(module: nn.Module, num_domains: int, gamma: float) -> DomainHeads:
    """Register ``module.drm_heads`` and the steering hook on ``module.head``; returns the existing
    heads if the module has them (a later fit or test of the same model, a restored checkpoint)."""
    if hasattr(module, HEADS):
        return getattr(module, HEADS)
    heads = DomainHeads(module.head, num_domains, gamma)
    module.add_module(HEADS, heads)
    module.head.register_forward_hook(heads.steer)
    return heads


def restore_heads(module: nn.Module, checkpoint: dict[str, Any]) -> None:
    """Restore hook (:func:`reglab.checkpoints.add_restore_hook`): a bare module gets its domain heads
    and the steering before the checkpoint's weights (which include the heads') are loaded."""
    spec = checkpoint[CHECKPOINT_KEY]
    add_heads(module, spec["num_domains"], spec["gamma"])


class DRM(Technique):
    """Domain-specific heads trained jointly with the shared one, steered per test sample (module docstring).

    Args:
        num_domains: the number of training domains (one head each); default the DataModule's
            ``num_train_domains``. Training batches' ``domain`` must lie in ``[0, num_domains)``.
        gamma: the steering's entropy exponent (``< 0``: the lowest-entropy head per sample).
        weight: weight of the domain heads' cross-entropy against the shared head's (the task loss).
    """

    name = "drm"
    needs = frozenset({"domain", "features"})
    fsdp_unsupported = ("its domain heads run on the features in the loss and in a hook, outside the sharded "
                        "module's own forward, where FSDP has not gathered their parameters")

    def __init__(self, num_domains: int | None = None, gamma: float = 1.0, weight: float = 1.0) -> None:
        if num_domains is not None and num_domains < 1:
            raise ValueError(f"DRM: num_domains must be >= 1, got {num_domains}")
        if weight < 0:
            raise ValueError(f"DRM: weight must be >= 0, got {weight}")
        self.num_domains, self.gamma, self.weight = num_domains, gamma, weight
        self._domains_checked = False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if not isinstance(getattr(pl_module, "head", None), nn.Module):
            raise self.fail(
                f"{type(pl_module).__name__} has no `head` layer to steer and copy per domain",
                "use a module whose classifier layer is `head` (ClassificationModule with a backbone that has no head of its own)",
            )
        count = self.num_domains or getattr(trainer.datamodule, "num_train_domains", None)
        if not count:
            raise self.fail(
                f"it needs the number of training domains, and {type(trainer.datamodule).__name__} has no num_train_domains",
                "pass num_domains=<number of training domains>",
            )
        # every stage: a checkpoint of this run holds the heads' weights, also for `reglab test`
        heads = add_heads(pl_module, int(count), self.gamma)
        if len(heads.heads) != count:
            raise self.fail(
                f"the model already has {len(heads.heads)} domain heads, but this run has {count} training domains",
                f"pass num_domains={len(heads.heads)}, or build a new model for this domain split",
            )
        heads.gamma = self.gamma

    def loss_terms(self, out: StepOutput, module: L.LightningModule) -> dict[str, Tensor]:
        heads = getattr(module, HEADS)
        domain = out.batch["domain"]
        if not self._domains_checked:  # one host sync, at the first step
            low, high = int(domain.min()), int(domain.max())
            if low < 0 or high >= len(heads.heads):
                raise self.fail(
                    f"a training batch has domain {high if high >= len(heads.heads) else low}, but there are "
                    f"{len(heads.heads)} domain heads (domains 0..{len(heads.heads) - 1})",
                    "pass num_domains = the number of training domains, whose indices come first",
                )
            self._domains_checked = True
        logits = heads(out.features)[domain, torch.arange(len(domain), device=domain.device)]
        return {"domain_heads": self.weight * cross_entropy_per_sample(logits, out.target).mean()}

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        heads = getattr(pl_module, HEADS)
        checkpoint[CHECKPOINT_KEY] = {"num_domains": len(heads.heads), "gamma": heads.gamma}
        add_restore_hook(checkpoint, "reglab.callbacks.domain_generalization.drm:restore_heads")
