"""Two-tower retrieval over categorical features: in-batch softmax with the sampling-bias correction.

The baseline of Yao et al., "Self-supervised Learning for Large-scale Item Recommendations" (2021),
section 3 (no official code is known; written from the paper): a query tower and an item tower, each
embedding its categorical features and running an MLP to an L2-normalised vector; the score
``s(q, x) = <q, x> / temperature``; training is a softmax over the batch's items, each logit
corrected by the log of the item's sampling probability (Yi et al., RecSys 2019: the batch softmax
over-penalises popular items, which appear as in-batch negatives in proportion to their frequency):

    s_c(q_i, x_j) = s(q_i, x_j) - log p_j,      loss_i = -log softmax_j s_c(q_i, x_j) at j = i

``p_j`` is item ``j``'s share of the training interactions (counted once in ``setup``, where Yi et al.
estimate it by streaming). Another occurrence of the positive item in the batch is not a negative:
its logit is masked. The correction applies in training only; retrieval scores every corpus item
by ``s``. Written by hand: neither torchmetrics nor pytorch-metric-learning has a two-tower model.

Evaluation scores every query against the whole item corpus (the item tower run once per
evaluation epoch) and logs ``<split>/recall@k`` and ``<split>/tail_recall@k`` (over the queries whose
item is a tail item): one relevant item per query, so recall@k is the share of queries whose item
ranks in the top k, averaged with torchmetrics' ``MeanMetric`` (summed across DDP ranks).

Example:
    >>> module = TwoTowerModule(query_cardinalities=(20, 8, 4), item_cardinalities=(50, 8, 16, 4))
    >>> module.query_tower(torch.zeros(2, 3, dtype=torch.long)).shape
    torch.Size([2, 32])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MeanMetric, MetricCollection

from reglab.mixins import RegularizedMixin, StepOutput
from reglab.tasks.passage_ranking import CorpusEvaluation


class CategoricalTower(nn.Module):
    """One embedding per categorical field, concatenated, an MLP, L2-normalised.

    Each field's table has one row more than its vocabulary: the *default* embedding that a masked
    feature takes (Yao et al. mask a feature by replacing it with a learned default embedding).

    Args:
        cardinalities: vocabulary size per field.
        embedding_dim: width of each field's embedding.
        hidden_dims: widths of the MLP's layers; the last is the output's.
    """

    def __init__(self, cardinalities: Sequence[int], embedding_dim: int, hidden_dims: Sequence[int]) -> None:
        super().__init__()
        self.embeddings = nn.ModuleList(nn.Embedding(size + 1, embedding_dim) for size in cardinalities)
        self.register_buffer("default_index", torch.tensor(list(cardinalities)), persistent=False)
        layers: list[nn.Module] = []
        width = embedding_dim * len(cardinalities)
        for i, out in enumerate(hidden_dims):
            layers.append(nn.Linear(width, out))
            if i < len(hidden_dims) - 1:
                layers.append(nn.ReLU())
            width = out
        self.mlp = nn.Sequential(*layers)
        self.output_dim = width

    def forward(self, features: Tensor, masked: Optional[Tensor] = None) -> Tensor:
        """``(N, F)`` long features (and an ``(N, F)`` or ``(F,)`` bool mask) → ``(N, D)`` unit vectors."""
        if masked is not None:
            features = torch.where(masked, self.default_index, features)
        embedded = torch.cat([table(features[:, i]) for i, table in enumerate(self.embeddings)], dim=-1)
        return F.normalize(self.mlp(embedded), dim=-1)


def recall_metrics(ks: Sequence[int], prefix: str, kinds: Sequence[str] = ("", "tail_")) -> MetricCollection:
    """``<prefix><kind>recall@<k>`` hit rates (``MeanMetric``\\ s of per-query hits) for every kind and ``k``."""
    return MetricCollection(
        {f"{kind}recall@{k}": MeanMetric() for kind in kinds for k in ks}, prefix=prefix,
        compute_groups=False,  # each member gets its own values; none may share another's state
    )


def target_ranks(scores: Tensor, targets: Tensor) -> Tensor:
    """0-based rank of each row's target column among the row's ``scores`` (ties counted in the target's favour)."""
    return (scores > scores.gather(1, targets[:, None])).sum(1)


class TwoTowerModule(CorpusEvaluation, RegularizedMixin, L.LightningModule):
    """Two-tower retrieval with the corrected in-batch softmax (see the module docstring).

    The step output's ``logits`` are the ``(N, N)`` corrected in-batch scores with ``target``
    ``arange(N)`` (the task loss is their cross-entropy; ``labels`` are the same in-batch indices),
    ``features`` the query embeddings; ``extras["item_ids"]`` the items' ids and
    ``extras["item_embedding"]`` their embeddings. Techniques that train the item tower
    further (correlated feature masking) call ``module.item_tower(features, masked)`` and read the
    corpus in ``module.item_table``.

    Args:
        query_cardinalities, item_cardinalities: vocabulary size per query / item field (item field
            0 is the item id); filled from the DataModule by the ``reglab`` CLI.
        embedding_dim: width of each field's embedding.
        hidden_dims: widths of each tower's MLP; the last is the embedding's.
        temperature: divides the cosine scores.
        popularity_correction: subtract ``log p_j`` from the training logits (the paper's baseline);
            ``False`` is the plain in-batch softmax.
        recall_ks: the ``k`` of the logged recall@k.
        lr, weight_decay: the default Adam optimizer's; a config's ``optimizer:`` replaces it.
    """

    provides = frozenset({"logits", "features", "index"})

    def __init__(
        self,
        query_cardinalities: Optional[Sequence[int]] = None,
        item_cardinalities: Optional[Sequence[int]] = None,
        embedding_dim: int = 16,
        hidden_dims: Sequence[int] = (64, 32),
        temperature: float = 0.05,
        popularity_correction: bool = True,
        recall_ks: Sequence[int] = (5, 20),
        lr: float = 1e-3,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__()
        if query_cardinalities is None or item_cardinalities is None:
            raise ValueError(
                "TwoTowerModule needs query_cardinalities and item_cardinalities: pass them (e.g. from "
                "RecommendationDataModule's attributes of those names), or run through `reglab`, which fills them "
                "from the DataModule."
            )
        if temperature <= 0 or not recall_ks or min(recall_ks) < 1:
            raise ValueError(f"TwoTowerModule: temperature must be > 0 and recall_ks positive, got {temperature}, {recall_ks}.")
        self.save_hyperparameters()
        self.query_tower = CategoricalTower(query_cardinalities, embedding_dim, hidden_dims)
        self.item_tower = CategoricalTower(item_cardinalities, embedding_dim, hidden_dims)
        num_items = item_cardinalities[0]
        # the corpus and its training popularity come from the DataModule in setup; kept in checkpoints
        # so that a loaded model evaluates without it
        self.register_buffer("item_table", torch.zeros(num_items, len(item_cardinalities), dtype=torch.long))
        self.register_buffer("log_popularity", torch.zeros(num_items))
        self.register_buffer("tail_items", torch.zeros(num_items, dtype=torch.bool))
        self.val_metrics = recall_metrics(recall_ks, "val/")
        self.test_metrics = recall_metrics(recall_ks, "test/")

    def setup(self, stage: str) -> None:
        data = self.trainer.datamodule
        if data is None:
            raise ValueError(
                "TwoTowerModule reads the item corpus, its training popularity and the tail split from the "
                "DataModule. Fix: fit with datamodule=RecommendationDataModule(...) instead of bare dataloaders."
            )
        expected = {"query_cardinalities": tuple(self.hparams.query_cardinalities),
                    "item_cardinalities": tuple(self.hparams.item_cardinalities)}
        for key, value in expected.items():
            if tuple(getattr(data, key, ())) != value:
                raise ValueError(
                    f"TwoTowerModule was built with {key}={value}, but {type(data).__name__} has "
                    f"{key}={getattr(data, key, None)}. Fix: leave {key} unset in the config (`reglab` fills it in "
                    "from the DataModule), or use a DataModule with item_features / item_counts / tail_items "
                    "(RecommendationDataModule)."
                )
        counts = data.item_counts.to(self.log_popularity)
        # an item never seen in training gets half a count: its correction stays finite
        probabilities = counts.clamp(min=0.5) / counts.sum()
        self.item_table.copy_(data.item_features)
        self.log_popularity.copy_(probabilities.log())
        self.tail_items.copy_(data.tail_items)

    def forward(self, queries: Tensor) -> Tensor:
        """Query embeddings of ``(N, F)`` query features."""
        return self.query_tower(queries)

    def forward_step(self, batch: dict[str, Any]) -> StepOutput:
        queries = self.query_tower(batch["input"])
        items = self.item_tower(batch["item_features"])
        item_ids = batch["target"]
        logits = queries @ items.T / self.hparams.temperature
        if self.hparams.popularity_correction:
            logits = logits - self.log_popularity[item_ids]
        repeated = (item_ids[:, None] == item_ids[None, :]) & ~torch.eye(len(item_ids), dtype=torch.bool, device=logits.device)
        logits = logits.masked_fill(repeated, float("-inf"))
        return StepOutput(logits=logits, target=torch.arange(len(item_ids), device=logits.device), features=queries,
                          index=batch.get("index"), batch=batch, extras={"item_ids": item_ids, "item_embedding": items})

    def corpus_embeddings(self) -> Tensor:
        """``(num_items, D)`` item embeddings of the corpus, computed once per evaluation epoch."""
        if self._corpus is None:
            with torch.no_grad():
                self._corpus = self.item_tower(self.item_table)
        return self._corpus

    def item_ranks(self, queries: Tensor, item_ids: Tensor) -> Tensor:
        """0-based rank of each query's item among the corpus (ties counted in the item's favour)."""
        return target_ranks(queries @ self.corpus_embeddings().T, item_ids)

    def on_step_output(self, out: StepOutput, stage: str) -> None:
        if stage == "train":
            return
        metrics = self.val_metrics if stage == "val" else self.test_metrics
        item_ids = out.extras["item_ids"]
        ranks = self.item_ranks(out.features.detach(), item_ids)
        tail = self.tail_items[item_ids]
        for k in self.hparams.recall_ks:
            hits = (ranks < k).float()
            metrics[f"recall@{k}"].update(hits)
            # an empty update would count nothing but MeanMetric warns on it
            if tail.any():
                metrics[f"tail_recall@{k}"].update(hits[tail])

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        """The ids of the ``max(recall_ks)`` best-scoring corpus items per query, best first."""
        scores = self.query_tower(batch["input"]) @ self.corpus_embeddings().T
        return scores.topk(min(max(self.hparams.recall_ks), scores.shape[1]), dim=1).indices

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
