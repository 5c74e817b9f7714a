"""Inference-free sparse retrieval: the FLOPS penalty, IDF, BM25, the normalized ensemble distillation
(hand-computed cases), the module's query and passage vectors, and a short fit that logs the
ranking and sparsity metrics."""

from __future__ import annotations

import math

import pytest
import torch

from reglab.callbacks.baselines import FLOPSRegularizer
from reglab.callbacks.metric_learning import InferenceFreeSparseRetrieval
from reglab.callbacks.metric_learning.inference_free_sparse_retrieval import (bm25_scores, ensemble_distillation_loss,
                                                                             min_max_normalize)
from reglab.datamodules import TextRetrievalDataModule
from reglab.registry import example_data, example_module, example_trainer
from reglab.tasks import SparseRetrievalModule
from reglab.tasks.sparse_retrieval import flops_penalty, flops_schedule, inverse_document_frequency
from reglab.technique import TechniqueConfigError


def test_flops_penalty_schedule_and_idf_by_hand():
    vectors = torch.tensor([[1.0, 0.0, 2.0], [3.0, 0.0, -4.0]])
    # piece means of |w|: 2, 0, 3
    assert flops_penalty(vectors).item() == pytest.approx(4 + 0 + 9)
    assert [flops_schedule(0.2, 5, step) for step in (0, 4, 7)] == pytest.approx([0.2 / 25, 0.2, 0.2])
    assert flops_schedule(0.2, 0, 0) == 0.2
    # 3 documents; piece 1 in all, 2 in one, 3 in none; 0 is padding
    idf = inverse_document_frequency(torch.tensor([[1, 2, 0], [1, 1, 0], [1, 0, 0]]), 4, ignore_ids=(0,))
    expected = [0.0, math.log(1 + 0.5 / 3.5), math.log(1 + 2.5 / 1.5), math.log(1 + 3.5 / 0.5)]
    assert idf.tolist() == pytest.approx(expected)


def test_bm25_and_the_normalized_ensemble_by_hand():
    scores = bm25_scores(torch.tensor([[5, 0]]), torch.tensor([[5, 5, 0], [6, 0, 0]]), 8, ignore_ids=(0,))
    # tf 2, length 2 of mean 1.5, idf log 2: 2·2.2 / (2 + 1.2·(0.25 + 0.75·2/1.5)) · log 2 = 4.4 / 3.5 · log 2
    assert scores[0].tolist() == pytest.approx([4.4 / 3.5 * math.log(2), 0.0])
    assert min_max_normalize(torch.tensor([[2.0, 4.0, 3.0]]))[0].tolist() == pytest.approx([0.0, 1.0, 0.5], abs=1e-5)
    # one teacher prefers candidate 1 by its whole range: target ≈ (e^-30, 1); student uniform: KL ≈ log 2
    loss = ensemble_distillation_loss(torch.zeros(1, 2), [torch.tensor([[1.0, 3.0]])])
    assert loss.item() == pytest.approx(math.log(2), abs=1e-4)
    # the teachers' scales do not matter, only their normalized order: a teacher ×100 gives the same loss
    student, teachers = torch.tensor([[1.0, 0.0, 2.0]]), [torch.tensor([[0.2, 0.9, 0.5]]), torch.tensor([[3.0, 1.0, 2.0]])]
    scaled = [teachers[0], 100 * teachers[1]]
    assert ensemble_distillation_loss(student, teachers).item() == pytest.approx(
        ensemble_distillation_loss(student, scaled).item(), abs=1e-5)


@pytest.fixture(scope="module")
def fitted():
    """A one-layer sparse retriever fitted for 3 steps with IDF-aware FLOPS and BM25 distillation."""
    module, data = example_module(data="text_retrieval"), example_data(256, "text_retrieval")
    technique = InferenceFreeSparseRetrieval(weight=0.05, warmup_steps=2, teachers=["bm25"])
    trainer = example_trainer(max_steps=3, limit_val_batches=0, callbacks=[technique])
    trainer.fit(module, datamodule=data)
    return module, data, technique, trainer


def test_query_and_passage_vectors(fitted):
    module, data, technique, _ = fitted
    ids = data.passages.encoded["input_ids"]
    # the IDF-aware loss's query weights are the passages' IDF; a query piece counts once, special tokens not
    idf = inverse_document_frequency(ids, module.vocab_size, module.special_ids.tolist())
    assert torch.equal(module.query_weights, idf)
    query = torch.tensor([[101, 2073, 2073, 2515, 102, 0]])
    vector = module.query_vectors(query)[0]
    assert vector.nonzero().flatten().tolist() == [2073, 2515]
    assert vector[2073].item() == pytest.approx(idf[2073].item())
    # passage vectors: non-negative, zero outside the corpus' word pieces, and a score's gradient on a
    # passage weight is the piece's IDF (what makes the FLOPS penalty IDF-aware)
    tokens = {key: data.passages.encoded[key][:3] for key in ("input_ids", "attention_mask")}
    passages = module.passage_vectors(tokens)
    assert passages.shape == (3, module.vocab_size) and (passages >= 0).all()
    assert not passages[:, ~module.output_tokens].any()
    corpus_pieces = torch.zeros(module.vocab_size, dtype=torch.bool)
    corpus_pieces[ids.flatten()] = True
    assert module.output_tokens[corpus_pieces & ~torch.isin(torch.arange(module.vocab_size), module.special_ids)].all()
    weights = passages.detach().requires_grad_()
    (module.query_vectors(query) @ weights.T).sum().backward()
    assert weights.grad[0, 2073].item() == pytest.approx(idf[2073].item())
    assert technique.teacher_scores[0].shape == (len(data.corpus.queries), len(ids))


def test_a_short_fit_logs_ranking_and_sparsity_metrics(fitted):
    module, data, _, trainer = fitted
    assert {"train/inference_free_sparse_retrieval/flops", "train/inference_free_sparse_retrieval/distillation"} \
        <= set(trainer.callback_metrics)
    (logged,) = example_trainer(limit_test_batches=1).test(module, datamodule=data, verbose=False)
    for name in ("test/ndcg@10", "test/mrr", "test/recall@1", "test/recall@10"):
        assert 0.0 <= logged[name] <= 1.0, name
    # recall@1 of two positives per query is at most a half
    assert logged["test/recall@1"] <= 0.5
    assert 0 < logged["test/doc_nonzeros"] <= int(module.output_tokens.sum())


def test_misuse_is_refused_early():
    with pytest.raises(TechniqueConfigError, match="FLOPSRegularizer: ClassificationModule makes no sparse passage"):
        example_trainer(max_steps=1, callbacks=[FLOPSRegularizer()]).fit(example_module(), datamodule=example_data())
    with pytest.raises(ValueError, match=r"teachers must be a non-empty list of \['dense', 'bm25'\]"):
        InferenceFreeSparseRetrieval(teachers=["colbert"])
    with pytest.raises(ValueError, match="weight and warmup_steps must be >= 0"):
        FLOPSRegularizer(weight=-1.0)
    with pytest.raises(ValueError, match="num_hard_negatives must be in"):
        TextRetrievalDataModule(num_entities=4, paired_attributes=2, num_hard_negatives=1000)
    with pytest.raises(ValueError, match="output_vocabulary must be 'corpus' or 'full'"):
        SparseRetrievalModule(output_vocabulary="all")
