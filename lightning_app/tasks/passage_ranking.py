"""What the text retrievers on :class:`~reglab.datamodules.TextRetrievalDataModule` share: the
transformers encoder they load, and their evaluation — every query of a split scored against every
passage of the corpus.

:class:`CorpusRanking` is mixed into a retriever (the sparse :class:`~reglab.tasks.SparseRetrievalModule`,
the dense :class:`~reglab.tasks.DenseRetrievalModule`) that implements ``passage_vectors(tokens)``
(``(N, D)`` vectors of passage tokens) and whose step output carries the queries' vectors in
``features``; a score is their dot product. Per query, torchmetrics' functional retrieval metrics
give ``<split>/ndcg@<k>`` (graded relevance), ``<split>/mrr`` and ``<split>/recall@<k>`` (the
passages stating the fact), averaged by ``MeanMetric``; a retriever adds its own per-corpus
metrics through ``corpus_metric_names`` and :meth:`CorpusRanking.update_corpus_metrics`. Its
epoch bookkeeping (:class:`CorpusEvaluation`: drop the cached corpus vectors, log and reset the
metrics) is also :class:`~reglab.tasks.TwoTowerModule`'s, whose corpus is an item table.

Example:
    >>> mean_pool(torch.tensor([[[1.0, 2.0], [3.0, 4.0], [9.0, 9.0]]]), torch.tensor([[1, 1, 0]]))
    tensor([[2., 3.]])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.functional.retrieval import retrieval_normalized_dcg, retrieval_recall, retrieval_reciprocal_rank

#: passages encoded at once when the corpus is scored
CORPUS_CHUNK = 128


def load_encoder(encoder: str, num_layers: Optional[int], owner: str) -> nn.Module:
    """The transformers model ``encoder`` (``package:<module>``, a directory or a hub id) in train
    mode, cut to its first ``num_layers`` layers (``None``: all); ``owner`` names the module in errors."""
    from transformers import AutoModel

    from reglab.models.external import transformers_path

    model = AutoModel.from_pretrained(transformers_path(encoder))
    model.train()  # from_pretrained returns eval mode; Lightning keeps each submodule's mode
    if num_layers is not None:
        if not 1 <= num_layers <= len(model.encoder.layer):
            raise ValueError(f"{owner}: num_layers must be in 1..{len(model.encoder.layer)} (the encoder's layers) or"
                             f" None, got {num_layers}.")
        model.encoder.layer = model.encoder.layer[:num_layers]
        model.config.num_hidden_layers = num_layers
    return model


def check_cutoffs(owner: str, ndcg_k: int, recall_ks: Sequence[int]) -> None:
    """Refuse cut-offs of the logged ``ndcg@k`` / ``recall@k`` that are not positive; ``owner`` names the module."""
    if ndcg_k < 1 or not recall_ks or min(recall_ks) < 1:
        raise ValueError(f"{owner}: ndcg_k and recall_ks must be positive, got {ndcg_k}, {recall_ks}. Fix: use e.g."
                         " ndcg_k 10 and recall_ks [1, 10].")


def mean_pool(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """``(N, D)`` mean of the ``(N, L, D)`` token states over the tokens the mask keeps
    (sentence-transformers' pooling of all-MiniLM-L6-v2)."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)


class CorpusEvaluation:
    """The evaluation-epoch bookkeeping of a retriever that scores queries against a whole corpus:
    the corpus' vectors (``_corpus``, computed by the host on first use) are dropped at the start
    and end of every evaluation epoch — the model trains on between them — and the host's
    ``val_metrics`` / ``test_metrics`` are logged and reset at the end."""

    _corpus: Optional[Tensor] = None

    def on_validation_epoch_start(self) -> None:
        self._corpus = None

    def on_test_epoch_start(self) -> None:
        self._corpus = None

    def on_predict_epoch_start(self) -> None:
        self._corpus = None

    def on_validation_epoch_end(self) -> None:
        self._log_corpus_metrics(self.val_metrics)

    def on_test_epoch_end(self) -> None:
        self._log_corpus_metrics(self.test_metrics)

    def _log_corpus_metrics(self, metrics: MetricCollection) -> None:
        self._corpus = None
        self.log_dict(metrics.compute())
        metrics.reset()


class CorpusRanking(CorpusEvaluation):
    """Evaluation of a retriever against the whole corpus of its DataModule (module docstring).

    The host module has ``hparams.ndcg_k`` and ``hparams.recall_ks``, implements
    ``passage_vectors(tokens)`` and ``encode_queries(batch)`` (``(N, D)`` query vectors of a batch,
    what prediction scores) and puts the same query vectors in its step output's ``features``; it
    calls :meth:`ranking_metrics` for its ``val_metrics`` / ``test_metrics``.
    """

    #: per-corpus metrics beyond the ranking ones, filled by :meth:`update_corpus_metrics`
    corpus_metric_names: tuple[str, ...] = ()

    def ranking_metrics(self, prefix: str) -> MetricCollection:
        names = [f"ndcg@{self.hparams.ndcg_k}", "mrr", *(f"recall@{k}" for k in self.hparams.recall_ks),
                 *self.corpus_metric_names]
        # each member gets its own values; none may share another's state
        return MetricCollection({name: MeanMetric() for name in names}, prefix=prefix, compute_groups=False)

    def update_corpus_metrics(self, metrics: MetricCollection, queries: Tensor, corpus: Tensor) -> None:
        """Update the members named in ``corpus_metric_names`` from a batch's query vectors and the corpus'."""

    def corpus_vectors(self) -> Tensor:
        """``(P, D)`` vectors of every passage of the DataModule's corpus, once per evaluation epoch."""
        if self._corpus is None:
            encoded = self.trainer.datamodule.passages.encoded
            with torch.no_grad():
                self._corpus = torch.cat([
                    self.passage_vectors({key: encoded[key][start:start + CORPUS_CHUNK].to(self.device)
                                          for key in ("input_ids", "attention_mask")})
                    for start in range(0, len(encoded["input_ids"]), CORPUS_CHUNK)])
        return self._corpus

    def on_step_output(self, out: Any, stage: str) -> None:
        if stage == "train":
            return
        metrics = self.val_metrics if stage == "val" else self.test_metrics
        corpus = self.corpus_vectors()
        queries = out.features.detach()
        scores = queries @ corpus.T
        relevance = out.batch["relevance"]
        answers = relevance == relevance.max()
        for row in range(len(scores)):
            metrics[f"ndcg@{self.hparams.ndcg_k}"].update(
                retrieval_normalized_dcg(scores[row], relevance[row], top_k=self.hparams.ndcg_k))
            metrics["mrr"].update(retrieval_reciprocal_rank(scores[row], answers[row]))
            for k in self.hparams.recall_ks:
                metrics[f"recall@{k}"].update(retrieval_recall(scores[row], answers[row], top_k=k))
        self.update_corpus_metrics(metrics, queries, corpus)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        """The ids of the ``ndcg_k`` best-scoring passages per query, best first."""
        scores = self.encode_queries(batch) @ self.corpus_vectors().T
        return scores.topk(min(self.hparams.ndcg_k, scores.shape[1]), dim=1).indices
