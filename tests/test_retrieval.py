"""Retrieval metrics (against PyTorch Metric Learning's AccuracyCalculator and torchmetrics), the
m-per-class sampler, the open-world digits split and the embedding task module."""

from __future__ import annotations

import doctest
import importlib
import math

import lightning as L
import pytest
import torch
from pytorch_metric_learning.distances import CosineSimilarity
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
from pytorch_metric_learning.utils.inference import CustomKNN
from torchmetrics.retrieval import RetrievalHitRate

from reglab.bench.protocols import ClaimError
from reglab.callbacks.baselines import SAM
from reglab.datamodules import DigitsDataModule, MPerClassSampler, OpenWorldDigitsDataModule
from reglab.metrics import OPIS, RecallAtK
from reglab.retrieval_claims import RetrievalProtocol
from reglab.step import StepOutput
from reglab.tasks import EmbeddingModule


def clustered(n_per_class=12, classes=5, dim=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(classes).repeat_interleave(n_per_class)
    centres = torch.randn(classes, dim, generator=generator)
    return centres[labels] + 0.9 * torch.randn(len(labels), dim, generator=generator), labels


def test_scores_match_pml_accuracy_calculator_and_torchmetrics_hit_rate():
    embeddings, labels = clustered()
    metric = RecallAtK(ks=(1, 4))
    metric.update(embeddings, labels, torch.arange(len(labels)))
    ours = metric.compute()
    n = len(labels)
    theirs = AccuracyCalculator(include=("precision_at_1", "mean_average_precision_at_r", "mean_reciprocal_rank"),
                                k=n - 1, knn_func=CustomKNN(CosineSimilarity())).get_accuracy(
        embeddings, labels, embeddings, labels, ref_includes_query=True)
    assert 0.0 < theirs["mean_average_precision_at_r"] < 1.0  # the case is neither trivial nor hopeless
    assert ours["recall_at_1"].item() == pytest.approx(theirs["precision_at_1"], abs=1e-6)
    assert ours["map_at_r"].item() == pytest.approx(theirs["mean_average_precision_at_r"], abs=1e-6)
    assert ours["mrr"].item() == pytest.approx(theirs["mean_reciprocal_rank"], abs=1e-6)
    # recall@k is torchmetrics' hit rate with every other sample as the query's documents
    query, document = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    others = query != document
    similarity = torch.nn.functional.normalize(embeddings, dim=1) @ torch.nn.functional.normalize(embeddings, dim=1).T
    hit_rate = RetrievalHitRate(top_k=4)
    hit_rate.update(similarity[others], (labels[query] == labels[document])[others], indexes=query[others])
    assert ours["recall_at_4"].item() == pytest.approx(hit_rate.compute().item(), abs=1e-6)


def test_gathered_shards_count_a_padded_repeat_once():
    """What DDP's gather hands ``compute``: two ranks' states, the second padded with a repeat of the
    first sample (a distributed evaluation sampler's padding); the result is the single-process one."""
    embeddings, labels = clustered(seed=1)
    index = torch.arange(len(labels))
    whole = RecallAtK()
    whole.update(embeddings, labels, index)
    rank0, rank1 = RecallAtK(), RecallAtK()
    half = len(labels) // 2
    rank0.update(embeddings[:half], labels[:half], index[:half])
    padded = torch.cat([index[half:], index[:1]])
    rank1.update(embeddings[padded], labels[padded], padded)
    rank0.merge_state(rank1)
    expected = {name: value.item() for name, value in whole.compute().items()}
    assert {name: value.item() for name, value in rank0.compute().items()} == pytest.approx(expected)
    # the repeat is a perfect same-class neighbour of sample 0: counted twice, recall@1 would rise
    naive = RecallAtK()
    naive.update(embeddings[torch.cat([index, index[:1]])], labels[torch.cat([index, index[:1]])],
                 torch.arange(len(labels) + 1))
    assert naive.compute()["recall_at_1"].item() > expected["recall_at_1"]


def test_m_per_class_batches_on_two_ranks_and_resume():
    labels = torch.arange(6).repeat_interleave(7)
    ranks = [MPerClassSampler(labels, batch_size=6, m=2, num_replicas=2, rank=r, seed=3) for r in (0, 1)]
    for sampler in ranks:
        sampler.set_epoch(1)
        batches = labels[torch.tensor(list(sampler))].view(-1, 3, 2)
        assert len(batches) == len(labels) // 6 // 2
        assert (batches == batches[..., :1]).all()  # m of a class, side by side
        assert all(len(set(batch[:, 0].tolist())) == 3 for batch in batches)  # three different classes
    full = list(ranks[0])
    ranks[0].resume(epoch=1, samples_done_per_rank=6)
    assert list(ranks[0]) == full[6:]
    with pytest.raises(ValueError, match="multiple of m"):
        MPerClassSampler(labels, batch_size=7, m=2)
    with pytest.raises(ValueError, match="needs 5 classes"):
        OpenWorldDigitsDataModule(seen_classes=[0, 1, 2], batch_size=20, m_per_class=4)


def test_open_world_split_trains_on_seen_and_tests_on_every_unseen_image():
    data = OpenWorldDigitsDataModule(seen_classes=[1, 3, 5, 7, 9], batch_size=20, seed=2)
    data.setup("fit")
    seen = {1, 3, 5, 7, 9}
    assert set(data.train_dataset.targets.tolist()) == set(data.val_dataset.targets.tolist()) == seen
    assert set(data.test_dataset.targets.tolist()) == set(range(10)) - seen
    sizes = [len(data.train_dataset), len(data.val_dataset), len(data.test_dataset)]
    digits = DigitsDataModule()
    digits.setup("fit")
    everything = torch.cat([digits.train_dataset.targets, digits.val_dataset.targets, digits.test_dataset.targets])
    assert sizes[2] == sum(int((everything == c).sum()) for c in range(10) if c not in seen)
    assert sum(sizes) == len(everything)
    with pytest.raises(ValueError, match="some but not all"):
        OpenWorldDigitsDataModule(seen_classes=range(10))


def hand_case():
    # a, b of class 0 at a right angle, c of class 1 opposite a
    return StepOutput(logits=torch.zeros(3, 3), target=torch.tensor([0, 0, 1]),
                      features=torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]))


def test_contrastive_loss_by_hand():
    module = EmbeddingModule("mlp", input_shape=(2,), loss="contrastive", miner=None)
    # positive pairs (a, b), (b, a) at distance sqrt 2; every negative is beyond the margin 1
    assert module.task_loss(hand_case()) == pytest.approx(torch.full((3,), math.sqrt(2)))


def test_infonce_by_hand():
    module = EmbeddingModule("mlp", input_shape=(2,), loss="infonce", loss_kwargs={"temperature": 1.0})
    # anchor a: positive b (cos 0), negative c (cos -1); anchor b: positive a (cos 0), negative c (cos 0)
    expected = (math.log(1 + math.exp(-1)) + math.log(2)) / 2
    assert module.task_loss(hand_case()) == pytest.approx(torch.full((3,), expected))


def test_bad_loss_is_refused():
    with pytest.raises(ValueError, match="loss 'arcface' is not one of"):
        EmbeddingModule("mlp", input_shape=(2,), loss="arcface")


def test_fit_with_a_technique_then_test_logs_the_metric_of_the_predicted_embeddings():
    """SAM (another family's technique, the contract's two passes) trains on the metric loss; the
    weights move, and what ``test`` logs is the metric of the embeddings ``predict`` returns."""
    L.seed_everything(0)
    data = OpenWorldDigitsDataModule(batch_size=20, m_per_class=4, flatten=True, eval_batch_size=256)
    module = EmbeddingModule("mlp", input_shape=data.input_shape, embedding_dim=16, loss="multi_similarity")
    before = module.projection.weight.detach().clone()
    trainer = L.Trainer(max_steps=5, limit_val_batches=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                        callbacks=[SAM(rho=0.05)])
    trainer.fit(module, datamodule=data)
    assert not torch.equal(module.projection.weight, before)
    (logged,) = trainer.test(module, datamodule=data, verbose=False)
    embeddings = torch.cat(trainer.predict(module, datamodule=data))
    assert embeddings.shape == (len(data.test_dataset), 16)
    direct = RecallAtK()
    direct.update(embeddings, data.test_dataset.targets, torch.arange(len(embeddings)))
    for name, value in direct.compute().items():
        assert logged[f"test/{name}"] == pytest.approx(value.item(), abs=1e-5)
    opis = OPIS()
    opis.update(embeddings, data.test_dataset.targets, torch.arange(len(embeddings)))
    assert logged["test/opis"] == pytest.approx(opis.compute().item(), abs=1e-5)


def test_retrieval_protocol_refuses_bad_settings_and_arms_at_load():
    with pytest.raises(ClaimError, match="needs 6 classes"):
        RetrievalProtocol("c", {"batch_size": 48, "m_per_class": 8})
    protocol = RetrievalProtocol("c", {})
    with pytest.raises(ClaimError, match="unknown field"):
        protocol.check_arm("a", {"loss": "triplet", "margin": 0.1})
    with pytest.raises(ClaimError, match="loss 'arcface'"):
        protocol.check_arm("a", {"loss": "arcface"})
    with pytest.raises(ClaimError, match="margn"):
        protocol.check_arm("a", {"loss": "triplet", "loss_kwargs": {"margn": 0.1}})
    with pytest.raises(ClaimError, match="a technique is"):
        protocol.check_arm("a", {"technique": "reglab.callbacks.baselines.SAM"})


@pytest.mark.parametrize("name", ["reglab.metrics.retrieval", "reglab.tasks.embedding", "reglab.datamodules.open_world",
                                  "reglab.datamodules.sampling"])
def test_docstring_examples_run(name):
    result = doctest.testmod(importlib.import_module(name), verbose=False)
    assert result.attempted > 0 and result.failed == 0
