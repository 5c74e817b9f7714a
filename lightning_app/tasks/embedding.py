"""Metric learning: a backbone to an L2-normalised embedding, trained with a metric loss."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import lightning as L
import torch
import torch.nn.functional as F
from pytorch_metric_learning import losses, miners
from torch import Tensor, nn

from reglab.metrics import OPIS, RecallAtK
from reglab.mixins import RegularizedMixin, StepOutput
from reglab.models import create_backbone

#: the base metric losses, PyTorch Metric Learning's classes with its default hyper-parameters
LOSSES = {
    "contrastive": losses.ContrastiveLoss,
    "triplet": losses.TripletMarginLoss,
    "multi_similarity": losses.MultiSimilarityLoss,
    "infonce": losses.NTXentLoss,
}
MINERS = {
    "multi_similarity": miners.MultiSimilarityMiner,
    "triplet_margin": miners.TripletMarginMiner,
    "pair_margin": miners.PairMarginMiner,
}
#: ``miner="auto"``: the multi-similarity miner for the pair and triplet losses (PML's README pairs
#: it with them); InfoNCE takes every in-batch pair, as in its paper
AUTO_MINER = {"contrastive": "multi_similarity", "triplet": "multi_similarity", "multi_similarity": "multi_similarity",
              "infonce": None}


class EmbeddingModule(RegularizedMixin, L.LightningModule):
    """Deep metric learning with any backbone: ``embedding = normalize(linear(backbone(x)))``.

    The task loss is the metric loss named by ``loss`` (PyTorch Metric Learning's, on the batch's
    embeddings and class labels, over the pairs or triplets its ``miner`` picks), so the baselines —
    contrastive, triplet, multi-similarity with a miner, InfoNCE — are configurations of this module
    and the family's techniques add to or replace it through the step contract.

    The step output carries the embeddings in ``features``, the backbone's output (before the
    projection) in ``extras["backbone_features"]`` and the class labels in ``target`` / ``labels``;
    ``logits`` is the batch's ``(N, N)`` cosine-similarity matrix (each sample
    scored against every other). A pair or triplet loss has no per-sample value, so the per-sample
    task loss is the batch's loss in every row (its mean is the loss). Validation and test log
    ``{val,test}/recall_at_<k>``, ``map_at_r`` and ``mrr`` of every sample of the split
    querying all the others (:class:`~reglab.metrics.RecallAtK`), and ``{val,test}/opis``, how
    unevenly one similarity threshold serves the split's classes (:class:`~reglab.metrics.OPIS`,
    its default calibration range); ``predict`` returns embeddings.

    Args:
        backbone: a name for :func:`reglab.models.create_backbone` (``"cnn"``, ``"mlp"``, ``"timm:..."``).
        input_shape: filled from the DataModule by the ``reglab`` CLI.
        embedding_dim: width of the embedding.
        loss: ``"contrastive"``, ``"triplet"``, ``"multi_similarity"`` or ``"infonce"`` (NT-Xent).
        loss_kwargs: passed to the loss (default: PML's defaults, e.g. ``{"temperature": 0.07}`` for InfoNCE).
        miner: ``"multi_similarity"``, ``"triplet_margin"``, ``"pair_margin"``, ``None`` (every pair /
            triplet of the batch) or ``"auto"`` (multi-similarity for the pair and triplet losses, none
            for InfoNCE).
        miner_kwargs: passed to the miner.
        recall_ks: the cut-offs of ``recall_at_<k>``.
        backbone_kwargs, pretrained: passed to the backbone factory.
        lr, weight_decay: the default Adam optimizer's; a config's ``optimizer:`` replaces it.

    Example:
        >>> module = EmbeddingModule("mlp", input_shape=(64,), embedding_dim=16)
        >>> embeddings = module(torch.randn(3, 64))
        >>> embeddings.shape, torch.allclose(embeddings.norm(dim=1), torch.ones(3))
        (torch.Size([3, 16]), True)
        >>> batch = {"input": torch.randn(4, 64), "target": torch.tensor([0, 0, 1, 1])}
        >>> module.task_loss(module.forward_step(batch)).shape
        torch.Size([4])
    """

    provides = frozenset({"features", "index"})

    def __init__(
        self,
        backbone: str = "cnn",
        input_shape: Optional[Sequence[int]] = None,
        embedding_dim: int = 64,
        loss: str = "multi_similarity",
        loss_kwargs: Optional[dict[str, Any]] = None,
        miner: Optional[str] = "auto",
        miner_kwargs: Optional[dict[str, Any]] = None,
        recall_ks: Sequence[int] = (1, 2, 4, 8),
        backbone_kwargs: Optional[dict[str, Any]] = None,
        pretrained: bool = False,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__()
        if input_shape is None:
            raise ValueError("EmbeddingModule needs input_shape: pass it (e.g. datamodule.input_shape), or run "
                             "through `reglab`, which fills it from a reglab DataModule.")
        if loss not in LOSSES:
            raise ValueError(f"EmbeddingModule: loss {loss!r} is not one of {sorted(LOSSES)}. Fix: pick one of them.")
        if miner == "auto":
            miner = AUTO_MINER[loss]
        if miner is not None and miner not in MINERS:
            raise ValueError(f"EmbeddingModule: miner {miner!r} is not one of {sorted(MINERS)}, None or 'auto'. "
                             "Fix: pick one of them.")
        self.save_hyperparameters()
        self.backbone = create_backbone(backbone, input_shape, pretrained=pretrained, **(backbone_kwargs or {}))
        if getattr(self.backbone, "has_head", False):
            raise ValueError(f"EmbeddingModule: backbone {backbone!r} brings its own classification head. Fix: use a "
                             "feature backbone (cnn, mlp, timm:<name>).")
        self.projection = nn.Linear(self.backbone.feature_dim, embedding_dim)
        self.loss_fn = LOSSES[loss](**(loss_kwargs or {}))
        self.miner = None if miner is None else MINERS[miner](**(miner_kwargs or {}))
        self.val_metrics = RecallAtK(recall_ks)
        self.test_metrics = RecallAtK(recall_ks)
        self.val_opis, self.test_opis = OPIS(), OPIS()

    def forward(self, x: Any) -> Tensor:
        return F.normalize(self.projection(self.backbone(x)), dim=-1)

    def forward_step(self, batch: dict[str, Any]) -> StepOutput:
        # the backbone's output travels in extras: a technique on the projection alone (ECAML's
        # energy confusion) reads it instead of running the backbone a second time
        backbone_features = self.backbone(batch["input"])
        embeddings = F.normalize(self.projection(backbone_features), dim=-1)
        return StepOutput(logits=embeddings @ embeddings.T, target=batch["target"], features=embeddings,
                          index=batch.get("index"), batch=batch, extras={"backbone_features": backbone_features})

    def task_loss(self, out: StepOutput) -> Tensor:
        embeddings, labels = out.features.float(), out.labels
        pairs = None if self.miner is None else self.miner(embeddings, labels)
        return self.loss_fn(embeddings, labels, pairs).expand(len(labels))

    def on_step_output(self, out: StepOutput, stage: str) -> None:
        if stage == "train":
            return
        if out.index is None:
            raise ValueError("EmbeddingModule: evaluation batches carry no `index`, which retrieval metrics need to "
                             "count each sample once under DDP. Fix: use a reglab DataModule (their batches have it).")
        for metric in (self.val_metrics, self.val_opis) if stage == "val" else (self.test_metrics, self.test_opis):
            metric.update(out.features, out.labels, out.index)

    def on_validation_epoch_end(self) -> None:
        self._log_retrieval(self.val_metrics, self.val_opis, "val/")

    def on_test_epoch_end(self) -> None:
        self._log_retrieval(self.test_metrics, self.test_opis, "test/")

    def _log_retrieval(self, metric: RecallAtK, opis: OPIS, prefix: str) -> None:
        if metric.update_count:
            self.log_dict({prefix + name: value for name, value in metric.compute().items()})
            self.log(prefix + "opis", opis.compute())
        metric.reset()
        opis.reset()

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        return self.eval_forward(batch).features

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
