"""Compressing features (Chen et al., TNNLS 2022, paper 54) — nested dropout or dropout on the
penultimate features, as information compression against noisy labels.

Memorizing wrong labels takes information the features must carry; compressing the features
limits it. Two compressions of the features ``f`` (D channels) before the classifier:

* **Nested dropout**: each training batch draws a truncation index ``k`` and keeps only the first
  ``k`` channels, ``f * [1, ..., 1, 0, ..., 0]``, so the first channels learn the most
  informative directions (an ordered representation). ``k`` follows the code's half-Gaussian
  ``p(k) ∝ exp(-((k - mu) / std)^2)``, ``k = 1..D``, one draw per batch.
* **Dropout**: ordinary dropout of the features with rate ``p``.

At evaluation, nested dropout keeps the first ``K`` channels, with ``K`` chosen as in the code
(``TestNested``): after every validation epoch, the ``K`` of the best validation accuracy over
every possible truncation (ties to the smaller ``K``); before the first validation all ``D``.
Dropout is the identity at evaluation.

Defaults follow the official code (github.com/yingyichen-cyy/Nested-Co-teaching,
``nested/train_resnet.py``, ``nested/utils.py``, ``nested/run_cifar.sh``): ``mu = 0``,
``std = 10`` (its ``--nested`` for CIFAR-10; 100 for CIFAR-100 and Clothing1M), dropout ``p =
0.3`` for CIFAR-10 (0.7 for CIFAR-100); the code uses one or the other, never both. The paper's
combination with Co-teaching is *stacking*: list ``co_teaching`` (the baselines family) with this
technique in the config; the peer network then runs the same compression, since Co-teaching runs
its peer through the module's own layers. The code's Co-teaching stage ranks the samples by a
no-gradient pass in evaluation mode (at the validation-chosen ``K``), which is ``co_teaching``'s
``selection: eval``: ``configs/technique/compressing_features_co_teaching.yaml`` is that recipe.
Where we differ: the code trains the two compressed networks alone first and then fine-tunes them
with Co-teaching (two stages, forget-rate ramp of 0 epochs); stacked here, both train from the
start in one fit. The code draws one truncation per step for both networks and runs each network
on its selected samples only (batch-norm statistics of that subset); here each network draws its
own and runs on the whole batch, its loss masked to the selection. The code selects ``K`` on a
clean validation set, so do we (reglab's label noise touches the training split only).

Design: model surgery at ``setup`` (before optimizers and checkpoint restore): the module's
``head`` becomes ``CompressedHead(compression, head)``, an ``nn.Sequential``, so the checkpoint
holds the chosen ``K`` (a buffer of the layer) and ``load_from_checkpoint`` redoes the surgery
through a restore hook the checkpoint names. The per-``K`` validation counts need the features
before compression and the labels: ``on_validation_batch_end`` runs the backbone on the batch
once more and scores every truncation with the head (validation costs one more backbone pass).

Method card (what it does, when it helps, what it costs): ``compressing_features.card.yaml``
beside this module.

Example:
    >>> import torch
    >>> layer = NestedDropout(features=4, std=1.0).eval()
    >>> layer.channels.fill_(2)
    tensor(2)
    >>> layer(torch.ones(1, 4))
    tensor([[1., 1., 0., 0.]])
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from reglab.checkpoints import add_restore_hook
from reglab.technique import Technique

METHODS = ("nested", "dropout")
STATE_KEY = "reglab_compressing_features"  # the layer's arguments, in the checkpoint, for the restore hook


def truncation_probabilities(features: int, mu: float, std: float) -> Tensor:
    """The code's ``GaussianDist``: ``p(k) ∝ exp(-((k - mu) / std)^2)`` for ``k = 1..features``."""
    k = torch.arange(1, features + 1, dtype=torch.float64)
    weights = torch.exp(-(((k - mu) / std) ** 2))
    return (weights / weights.sum()).float()


def truncation_correct(features: Tensor, head: nn.Module, target: Tensor) -> Tensor:
    """``(D,)``: entry ``k - 1`` counts the samples ``head`` classifies right from the first ``k``
    channels of ``features`` (``(N, D)``)."""
    masks = torch.ones(features.shape[-1], features.shape[-1], device=features.device).tril()
    predictions = head(features.unsqueeze(0) * masks.unsqueeze(1)).argmax(-1)  # (D, N)
    return (predictions == target.unsqueeze(0)).sum(-1).float()


def best_channels(correct: Tensor, seen: Tensor | float) -> int:
    """The code's rule for the evaluation ``K``: the best accuracy less 1e-5 per channel, so
    ties go to fewer channels."""
    penalty = 1e-5 * torch.arange(correct.shape[0], device=correct.device)
    return int((correct / max(float(seen), 1.0) - penalty).argmax()) + 1


class NestedDropout(nn.Module):
    """Keep the first ``k`` of ``features`` channels: ``k`` drawn per batch in training, the buffer
    ``channels`` (all, until a technique chooses) at evaluation. ``features`` is the last dimension."""

    def __init__(self, features: int, std: float = 10.0, mu: float = 0.0) -> None:
        super().__init__()
        if features < 1 or std <= 0:
            raise ValueError(f"NestedDropout: needs features >= 1 and std > 0, got {features}, {std}")
        self.features, self.std, self.mu = features, std, mu
        self.register_buffer("probabilities", truncation_probabilities(features, mu, std), persistent=False)
        self.register_buffer("channels", torch.tensor(features))

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            # on the device, from the global torch RNG (saved in checkpoints): no host sync
            keep = torch.multinomial(self.probabilities, 1) + 1
        else:
            keep = self.channels
        mask = torch.arange(self.features, device=x.device) < keep.to(x.device)
        return x * mask.to(x.dtype)

    def extra_repr(self) -> str:
        return f"features={self.features}, std={self.std}, mu={self.mu}"


class CompressedHead(nn.Sequential):
    """``head(compression(features))``: what the surgery puts in place of the module's head."""

    def __init__(self, compression: nn.Module, head: nn.Module) -> None:
        super().__init__(compression, head)


def build_compression(method: str, features: int, std: float, mu: float, p: float) -> nn.Module:
    return NestedDropout(features, std=std, mu=mu) if method == "nested" else nn.Dropout(p)


def compress_head(module: nn.Module, arguments: dict[str, Any]) -> CompressedHead:
    """Put ``CompressedHead(compression, head)`` in place of ``module.head`` (once)."""
    if isinstance(module.head, CompressedHead):
        return module.head
    module.head = CompressedHead(build_compression(**arguments), module.head)
    return module.head


def restore_compression(module: nn.Module, checkpoint: dict[str, Any]) -> None:
    """Restore hook: a bare module gets its compressed head before the checkpoint's weights load."""
    compress_head(module, checkpoint[STATE_KEY])


class FeatureCompression(Technique):
    """Nested dropout or dropout on the features before the classifier (module docstring).

    Args:
        method: ``"nested"`` (nested dropout) or ``"dropout"``.
        std, mu: the half-Gaussian of nested dropout's truncation index (the code's
            ``--nested`` and ``--mu``).
        p: the dropout rate of ``method="dropout"``.
        select_channels: for nested dropout, choose the evaluation ``K`` on validation as the
            code does (``False``: evaluate with all channels).

    Works on a module with a ``head`` that maps ``(N, D)`` features to logits and a backbone
    declaring ``feature_dim`` (``ClassificationModule``). Logs ``val/compressing_features/channels``.
    """

    name = "compressing_features"

    def __init__(self, method: str = "nested", std: float = 10.0, mu: float = 0.0, p: float = 0.3,
                 select_channels: bool = True) -> None:
        if method not in METHODS:
            raise ValueError(f"FeatureCompression: method must be one of {METHODS}, got {method!r}")
        if std <= 0 or not 0.0 <= p < 1.0:
            raise ValueError(f"FeatureCompression: needs std > 0 and p in [0, 1), got std={std}, p={p}")
        self.method, self.std, self.mu, self.p = method, std, mu, p
        self.select_channels = select_channels and method == "nested"
        self._correct: Tensor | None = None  # per K: correct validation predictions so far
        self._seen: Tensor | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        head = getattr(pl_module, "head", None)
        features = getattr(getattr(pl_module, "backbone", None), "feature_dim", None)
        if not isinstance(head, nn.Module) or features is None:
            raise self.fail(
                f"{type(pl_module).__name__} has no `head` module fed by a backbone with `feature_dim`, so there "
                "are no penultimate features to compress",
                "use a ClassificationModule with a backbone that has a separate head (not an `hf:` model "
                "with its own classifier)",
            )
        compress_head(pl_module, self.arguments(int(features)))

    def arguments(self, features: int) -> dict[str, Any]:
        return {"method": self.method, "features": features, "std": self.std, "mu": self.mu, "p": self.p}

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.select_channels and not trainer.sanity_checking:
            self._correct = torch.zeros(pl_module.head[0].features, device=pl_module.device)
            self._seen = torch.zeros((), device=pl_module.device)

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                                batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        if self._correct is None:
            return
        # the features again (the step does not hand them to callbacks): one more backbone pass
        features = pl_module.backbone(batch["input"])
        self._correct += truncation_correct(features, pl_module.head[1], batch["target"])
        self._seen += features.shape[0]

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._correct is None:
            return
        correct = pl_module.all_gather(self._correct).reshape(-1, self._correct.shape[0]).sum(0)
        seen = pl_module.all_gather(self._seen).sum()
        self._correct = self._seen = None
        layer = pl_module.head[0]
        layer.channels.fill_(best_channels(correct, seen))
        pl_module.log("val/compressing_features/channels", layer.channels.float())

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        layer = pl_module.head[0]
        features = layer.features if isinstance(layer, NestedDropout) else int(pl_module.backbone.feature_dim)
        checkpoint[STATE_KEY] = self.arguments(features)
        add_restore_hook(checkpoint, "reglab.callbacks.noisy_labels.compressing_features:restore_compression")
