"""KaLM-Embedding-V2 on the dense retriever: the focal-weighted InfoNCE and the hard-negative mixing by
hand, the technique against the module's plain InfoNCE, the dense module's in-batch masking, a short
fit, and misuse refused at setup."""

from __future__ import annotations

import doctest
import importlib
import math

import pytest
import torch
import torch.nn.functional as F

from reglab.callbacks.fine_tuning import KaLMEmbeddingV2
from reglab.callbacks.fine_tuning.kalm_embedding_v2 import (focal_infonce, hardest_negatives, interpolate,
                                                            mix_hard_negatives)
from reglab.datamodules import DigitsDataModule, TextRetrievalDataModule
from reglab.registry import example_trainer
from reglab.step import StepOutput
from reglab.tasks import ClassificationModule, DenseRetrievalModule
from reglab.technique import TechniqueConfigError


def test_focal_infonce_weights_each_query_by_one_minus_its_positive_probability():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 2.0, 1.0]])
    target = torch.tensor([0, 0])
    for gamma in (0.0, 1.0, 2.0):
        expected = []
        for row in logits.tolist():
            p = math.exp(row[0]) / sum(math.exp(v) for v in row)
            expected.append(-((1 - p) ** gamma) * math.log(p))
        torch.testing.assert_close(focal_infonce(logits, target, gamma), torch.tensor(expected))


def test_focal_infonce_leaves_masked_candidates_out():
    masked = torch.tensor([[1.0, float("-inf"), 0.0]])
    torch.testing.assert_close(focal_infonce(masked, torch.tensor([0]), 2.0),
                               focal_infonce(torch.tensor([[1.0, 0.0]]), torch.tensor([0]), 2.0))


def test_hardest_negatives_are_the_most_similar_first():
    queries = torch.tensor([[1.0, 0.0]])
    negatives = torch.tensor([[[0.0, 1.0], [0.8, 0.6], [0.6, 0.8]]])
    torch.testing.assert_close(hardest_negatives(queries, negatives, 2), torch.tensor([[[0.8, 0.6], [0.6, 0.8]]]))


def test_interpolate_normalizes_the_weighted_mix():
    points = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    mixed = interpolate(points, torch.tensor([[0]]), torch.tensor([[1]]), torch.tensor([[0.25]]))
    torch.testing.assert_close(mixed, torch.tensor([[[0.25, 0.75]]]) / math.hypot(0.25, 0.75))


def test_mixes_combine_two_distinct_negatives_and_keep_the_query_share_below_half():
    torch.manual_seed(0)
    hardest = torch.eye(4)[:3].expand(5, 3, 4)  # three orthogonal negatives, the query on the fourth axis
    queries = torch.eye(4)[3].expand(5, 4)
    mixed = mix_hard_negatives(queries, hardest, pair_mixes=6, query_mixes=6)
    assert mixed.shape == (5, 12, 4)
    torch.testing.assert_close(mixed.norm(dim=-1), torch.ones(5, 12))
    pairs, with_query = mixed[:, :6], mixed[:, 6:]
    assert (pairs[..., 3] == 0).all() and ((pairs[..., :3] > 0).sum(-1) == 2).all()
    assert ((with_query[..., :3] > 0).sum(-1) == 1).all()
    assert (with_query[..., 3] < with_query[..., :3].amax(-1)).all()


def step_output(num_queries: int = 3, num_negatives: int = 2, dim: int = 8) -> StepOutput:
    torch.manual_seed(1)
    queries = F.normalize(torch.randn(num_queries, dim), dim=-1).requires_grad_()
    candidates = F.normalize(torch.randn(num_queries * (1 + num_negatives), dim), dim=-1).requires_grad_()
    logits = queries @ candidates.T / 0.05
    return StepOutput(logits=logits, target=torch.arange(num_queries), features=queries,
                      extras={"candidates": candidates, "temperature": 0.05,
                              "hard_negatives": candidates[num_queries:].view(num_queries, num_negatives, dim)})


def test_without_reweighting_or_mixing_it_is_the_modules_plain_infonce():
    out = step_output()
    technique = KaLMEmbeddingV2(gamma=0.0, pair_mixes=0, query_mixes=0)
    torch.testing.assert_close(technique.task_loss(out, None), F.cross_entropy(out.logits, out.target, reduction="none"))


def test_mixed_negatives_enlarge_the_denominator_and_carry_no_gradient():
    out = step_output()
    plain = KaLMEmbeddingV2(gamma=0.0, pair_mixes=0, query_mixes=0).task_loss(out, None)
    torch.manual_seed(2)
    mixed = KaLMEmbeddingV2(gamma=0.0, pair_mixes=3, query_mixes=3).task_loss(out, None)
    assert (mixed > plain).all()
    # candidates that reach the loss only through the mixing: the synthetic negatives are built
    # without gradient, so the loss moves the queries and not them
    candidates = out.extras["candidates"]
    out.logits = out.features @ candidates.detach().T / 0.05
    loss = KaLMEmbeddingV2(gamma=2.0, pair_mixes=3, query_mixes=3).task_loss(out, None).sum()
    grad_queries, grad_candidates = torch.autograd.grad(loss, [out.features, candidates], allow_unused=True)
    assert grad_queries.abs().sum() > 0 and grad_candidates is None


@pytest.fixture(scope="module")
def corpus():
    data = TextRetrievalDataModule(num_entities=8, paired_attributes=3, num_hard_negatives=2, batch_size=4,
                                   eval_batch_size=32)
    data.setup("fit")
    return data


def test_dense_module_masks_in_batch_candidates_that_answer_the_query(corpus):
    module = DenseRetrievalModule(num_layers=1)
    batch = next(iter(corpus.train_dataloader()))
    out = module.forward_step(batch)
    candidate_ids = torch.cat([batch["positive_id"], batch["hard_negative_ids"].flatten()])
    for query in range(len(batch["target"])):
        answers = corpus.relevance[batch["target"][query], candidate_ids] == 2
        answers[query] = False
        assert torch.isinf(out.logits[query, answers]).all()
        assert torch.isfinite(out.logits[query, ~answers]).all()
    assert out.extras["hard_negatives"].shape == (4, 2, 384)


def test_a_short_fit_with_the_technique_logs_ranking_metrics(corpus):
    module = DenseRetrievalModule(num_layers=1, lr=1e-4)
    trainer = example_trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=1,
                              callbacks=[KaLMEmbeddingV2(pair_mixes=2, query_mixes=2)])
    trainer.fit(module, datamodule=corpus)
    logged = trainer.callback_metrics
    assert {"val/ndcg@10", "val/mrr", "val/recall@1", "val/recall@10"} <= set(logged)
    assert 0 < float(logged["val/ndcg@10"]) <= 1
    assert torch.isfinite(logged["train/loss"])


def test_misuse_is_refused_at_setup(corpus):
    with pytest.raises(TechniqueConfigError, match="KaLMEmbeddingV2: ClassificationModule is no dense bi-encoder"):
        example_trainer(max_steps=1, callbacks=[KaLMEmbeddingV2()]).fit(
            ClassificationModule("mlp", num_classes=10, input_shape=(64,)), datamodule=DigitsDataModule(flatten=True))
    with pytest.raises(TechniqueConfigError, match="top_k=5 is more than the 2 hard negatives"):
        example_trainer(max_steps=1, callbacks=[KaLMEmbeddingV2(top_k=5)]).fit(
            DenseRetrievalModule(num_layers=1), datamodule=corpus)
    with pytest.raises(ValueError, match="gamma must be >= 0"):
        KaLMEmbeddingV2(gamma=-1.0)


def test_dense_soup_protocol_refuses_malformed_arms_and_ingredients():
    from reglab.bench.protocols import ClaimError
    from reglab.dense_retrieval_claims import DenseSoupProtocol

    settings = {"configs": ["configs/experiment/text_dense_retrieval.yaml"]}
    with pytest.raises(ClaimError, match="`ingredient_overrides` is a list of two or more lists"):
        DenseSoupProtocol("c", {**settings, "ingredient_overrides": [["--model.init_args.lr=1e-4"], []]})
    protocol = DenseSoupProtocol("c", settings)
    with pytest.raises(ClaimError, match="`soup` is one of"):
        protocol.check_arm("a", {"soup": "average"})
    protocol.check_arm("a", {"soup": "greedy", "configs": ["configs/technique/kalm_embedding_v2.yaml"]})


@pytest.mark.parametrize("name", ["reglab.callbacks.fine_tuning.kalm_embedding_v2", "reglab.tasks.passage_ranking"])
def test_docstring_examples_run(name):
    assert doctest.testmod(importlib.import_module(name), verbose=False).failed == 0
