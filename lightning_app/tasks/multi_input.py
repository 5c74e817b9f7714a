"""Multi-input retrieval: an image and a free-text hint, fused into one query, retrieve an item.

The miniature of the trimodal model of McKee et al., "Language-Guided Music Recommendation for Video
via Prompt Analogies" (CVPR 2023, ViML: video + text → music): one encoder per query input (a small
CNN for the image where ViML has CLIP frame features and a transformer, a bag of learned token
embeddings for the hint where ViML has CLIP text features and a transformer), a fusion MLP over the
two (ViML's fusion module), and an item tower (a learned embedding per catalogue item where ViML
encodes the music). Query and items are L2-normalised; the score is their cosine over
``temperature``. The catalogue is small, so training is a softmax over *all* items (ViML's
contrastive loss over the batch's music, with every item as a negative): the step output's
``logits`` are ``(N, num_items)`` and ``target`` the item id, so the mixin's default cross-entropy
is the task loss and every technique of the step contract stacks.

A query *without text* carries the empty hint (:attr:`~reglab.datamodules.HintedDigitsDataModule.empty_text`,
``[CLS] [SEP]``): what a user who types nothing sends. :meth:`MultiInputRetrievalModule.without_text`
replaces chosen rows' hints by it; text dropout (``reglab.callbacks.metric_learning.TextDropout``)
calls it on training batches, and evaluation calls it on every batch, so validation and test log
both ``<split>/recall@k`` (image and hint) and ``<split>/no_text_recall@k`` (image alone), one
relevant item per query, averaged with torchmetrics' ``MeanMetric`` (summed across DDP ranks).

Written by hand: no library has a multi-input retrieval model; there is no official ViML code.

Example:
    >>> module = MultiInputRetrievalModule(num_items=40, vocab_size=30522, max_text_length=4)
    >>> text = {"input_ids": torch.tensor([[101, 1996, 2417, 102]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    >>> module(torch.zeros(1, 1, 8, 8), text).shape
    torch.Size([1, 40])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MetricCollection

from reglab.mixins import RegularizedMixin, StepOutput
from reglab.models import create_backbone
from reglab.tasks.two_tower import recall_metrics, target_ranks


class BagOfTokens(nn.Module):
    """A text's learned token embeddings, averaged over its attention mask: ``(N, L)`` ids → ``(N, D)``."""

    def __init__(self, vocab_size: int, dim: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, dim)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        mask = attention_mask.unsqueeze(-1).to(self.embedding.weight.dtype)
        return (self.embedding(input_ids) * mask).sum(1) / mask.sum(1).clamp(min=1)


class MultiInputRetrievalModule(RegularizedMixin, L.LightningModule):
    """Image + text hint → item retrieval (see the module docstring).

    Batches carry ``input`` (images), ``text`` (tokenizer tensors with ``input_ids`` and
    ``attention_mask``) and ``target`` (the item id), as
    :class:`~reglab.datamodules.HintedDigitsDataModule`'s do. The step output's ``features`` are the
    fused query embeddings, ``logits`` their scores against every item.

    Args:
        num_items: catalogue size; filled from the DataModule by the ``reglab`` CLI.
        vocab_size: the tokenizer's vocabulary size; filled from the DataModule.
        max_text_length: tokens per hint; filled from the DataModule.
        input_shape: the image shape; filled from the DataModule.
        backbone, backbone_kwargs: the image encoder (:func:`reglab.models.create_backbone`).
        text_dim: width of the token embeddings.
        hidden_dim: width of the fusion MLP's hidden layer.
        embedding_dim: width of the query and item embeddings.
        temperature: divides the cosine scores.
        recall_ks: the ``k`` of the logged recall@k.
        lr, weight_decay: the default Adam optimizer's; a config's ``optimizer:`` replaces it.
    """

    provides = frozenset({"logits", "features", "index"})

    def __init__(
        self,
        num_items: Optional[int] = None,
        vocab_size: Optional[int] = None,
        max_text_length: Optional[int] = None,
        input_shape: Sequence[int] = (1, 8, 8),
        backbone: str = "cnn",
        backbone_kwargs: Optional[dict[str, Any]] = None,
        text_dim: int = 32,
        hidden_dim: int = 64,
        embedding_dim: int = 32,
        temperature: float = 0.1,
        recall_ks: Sequence[int] = (1, 4),
        lr: float = 1e-3,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__()
        if num_items is None or vocab_size is None or max_text_length is None:
            raise ValueError("MultiInputRetrievalModule needs num_items, vocab_size and max_text_length: pass them (e.g. from "
                             "HintedDigitsDataModule's attributes of those names), or run through `reglab`, which "
                             "fills them from the DataModule.")
        if temperature <= 0 or not recall_ks or min(recall_ks) < 1:
            raise ValueError(f"MultiInputRetrievalModule: temperature must be > 0 and recall_ks positive, got "
                             f"{temperature}, {list(recall_ks)}.")
        self.save_hyperparameters()
        self.image_encoder = create_backbone(backbone, input_shape, **(backbone_kwargs or {}))
        self.text_encoder = BagOfTokens(vocab_size, text_dim)
        self.fusion = nn.Sequential(nn.Linear(self.image_encoder.feature_dim + text_dim, hidden_dim), nn.ReLU(),
                                    nn.Linear(hidden_dim, embedding_dim))
        self.items = nn.Embedding(num_items, embedding_dim)
        # the empty hint's tokens come from the DataModule in setup; kept in checkpoints, so that a
        # loaded model can be queried without text
        self.register_buffer("empty_text_ids", torch.zeros(max_text_length, dtype=torch.long))
        self.register_buffer("empty_text_mask", torch.zeros(max_text_length, dtype=torch.long))
        self.val_metrics = recall_metrics(recall_ks, "val/", kinds=("", "no_text_"))
        self.test_metrics = recall_metrics(recall_ks, "test/", kinds=("", "no_text_"))

    def setup(self, stage: str) -> None:
        data = self.trainer.datamodule
        empty = getattr(data, "empty_text", None)
        if empty is None:
            if stage != "fit":  # evaluating a checkpoint, whose buffers hold the empty hint (restored after setup)
                return
            source = "no DataModule is attached" if data is None else f"{type(data).__name__} has no `empty_text`"
            raise ValueError(
                f"MultiInputRetrievalModule reads the empty hint (a query without text) from the DataModule, and "
                f"{source}. Fix: fit with datamodule=HintedDigitsDataModule(...)."
            )
        for key in ("num_items", "vocab_size", "max_text_length"):
            if getattr(data, key, None) != self.hparams[key]:
                raise ValueError(
                    f"MultiInputRetrievalModule was built with {key}={self.hparams[key]}, but {type(data).__name__} "
                    f"has {key}={getattr(data, key, None)}. Fix: leave {key} unset in the config (`reglab` fills it "
                    "in from the DataModule)."
                )
        self.empty_text_ids.copy_(empty["input_ids"])
        self.empty_text_mask.copy_(empty["attention_mask"])

    def forward(self, images: Tensor, text: dict[str, Tensor]) -> Tensor:
        """``(N, num_items)`` scores of the queries (images and hints) against every item."""
        return self.scores(self.query(images, text))

    def scores(self, queries: Tensor) -> Tensor:
        """``(N, num_items)`` cosine scores of query embeddings against every item, over the temperature."""
        return queries @ F.normalize(self.items.weight, dim=-1).T / self.hparams.temperature

    def query(self, images: Tensor, text: dict[str, Tensor]) -> Tensor:
        """``(N, embedding_dim)`` unit query embeddings of images and their hints."""
        features = torch.cat([self.image_encoder(images), self.text_encoder(text["input_ids"], text["attention_mask"])],
                             dim=-1)
        return F.normalize(self.fusion(features), dim=-1)

    def without_text(self, batch: dict[str, Any], rows: Tensor) -> dict[str, Any]:
        """The batch with the hints of ``rows`` (an ``(N,)`` bool mask) replaced by the empty hint."""
        if not self.empty_text_mask.any():
            raise RuntimeError("MultiInputRetrievalModule: the empty hint is not known yet (it is read from the "
                               "DataModule in setup). Fix: fit, validate or test with a HintedDigitsDataModule, or "
                               "load a checkpoint of a fitted model.")
        text = batch["text"]
        keep = ~rows.to(text["input_ids"].device)[:, None]
        dropped = {"input_ids": torch.where(keep, text["input_ids"], self.empty_text_ids),
                   "attention_mask": torch.where(keep, text["attention_mask"], self.empty_text_mask)}
        return {**batch, "text": {**text, **dropped}}

    def forward_step(self, batch: dict[str, Any]) -> StepOutput:
        queries = self.query(batch["input"], batch["text"])
        return StepOutput(logits=self.scores(queries), target=batch["target"], features=queries, index=batch.get("index"), batch=batch)

    def on_step_output(self, out: StepOutput, stage: str) -> None:
        if stage == "train":
            return
        metrics = self.val_metrics if stage == "val" else self.test_metrics
        batch = out.batch
        no_text = self.without_text(batch, torch.ones(len(out.target), dtype=torch.bool))
        for kind, logits in (("", out.logits), ("no_text_", self(no_text["input"], no_text["text"]))):
            ranks = target_ranks(logits.detach(), out.target)
            for k in self.hparams.recall_ks:
                metrics[f"{kind}recall@{k}"].update((ranks < k).float())

    def on_validation_epoch_end(self) -> None:
        self._log_recall(self.val_metrics)

    def on_test_epoch_end(self) -> None:
        self._log_recall(self.test_metrics)

    def _log_recall(self, metrics: MetricCollection) -> None:
        self.log_dict(metrics.compute())
        metrics.reset()

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        """The ids of the ``max(recall_ks)`` best-scoring items per query, best first."""
        scores = self(batch["input"], batch["text"])
        return scores.topk(min(max(self.hparams.recall_ks), scores.shape[1]), dim=1).indices

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
