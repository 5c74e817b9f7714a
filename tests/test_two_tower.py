"""The generated recommendation data and the two-tower baseline: the data's structure, the corrected
in-batch softmax and recall@k against hand-computed cases, the shape checks, and a short fit."""

from __future__ import annotations

import doctest
import math

import pytest
import torch
import torch.nn.functional as F

import reglab.datamodules.recommendation
import reglab.tasks.two_tower
from reglab.datamodules import RecommendationDataModule
from reglab.registry import example_trainer
from reglab.tasks import TwoTowerModule

SMALL = dict(num_items=60, num_users=30, num_categories=4, num_brands=8, num_prices=3, num_interactions=1500)


def small_data(**kwargs):
    data = RecommendationDataModule(**{**SMALL, "batch_size": 64, **kwargs})
    data.setup("fit")
    return data


def test_docstring_examples_run():
    for module in (reglab.datamodules.recommendation, reglab.tasks.two_tower):
        assert doctest.testmod(module, raise_on_error=True).attempted > 0


def test_data_is_seeded_and_batches_carry_their_items_features():
    data, again, other = small_data(seed=3), small_data(seed=3), small_data(seed=4)
    assert torch.equal(data.train_dataset.inputs, again.train_dataset.inputs)
    assert torch.equal(data.item_features, again.item_features)
    assert not torch.equal(data.train_dataset.targets, other.train_dataset.targets)
    batch = next(iter(data.val_dataloader()))
    assert torch.equal(batch["item_features"], data.item_features[batch["target"]])
    assert torch.equal(batch["is_tail"], data.tail_items[batch["target"]])
    assert torch.equal(data.item_features[:, 0], torch.arange(SMALL["num_items"]))
    # each brand sells in one category: the correlation correlated feature masking exploits
    brand_category = {}
    for _, category, brand, _ in data.item_features.tolist():
        assert brand_category.setdefault(brand, category) == category
    # every query asks for a category its item is in
    assert torch.equal(batch["input"][:, 1], batch["item_features"][:, 1])
    sizes = [len(d) for d in (data.train_dataset, data.val_dataset, data.test_dataset)]
    assert sum(sizes) == SMALL["num_interactions"] and min(sizes) > 0


def test_popularity_follows_a_power_law_and_the_tail_is_the_unpopular_items():
    data = small_data(num_interactions=6000)
    assert data.tail_items.sum() == SMALL["num_items"] - round(0.2 * SMALL["num_items"])
    counts = data.item_counts.float()
    head_mean, tail_mean = counts[~data.tail_items].mean(), counts[data.tail_items].mean()
    assert head_mean > 3 * tail_mean
    flat = small_data(num_interactions=6000, popularity_exponent=0.0).item_counts.float()
    assert flat.max() / flat.mean() < counts.max() / counts.mean()


@pytest.mark.parametrize("bad, words", [
    ({"num_brands": 2}, "num_brands"),
    ({"head_fraction": 1.0}, "head_fraction"),
    ({"val_fraction": 0.6, "test_fraction": 0.5}, "sum to < 1"),
])
def test_bad_data_arguments_are_refused_early(bad, words):
    with pytest.raises(ValueError, match=words):
        RecommendationDataModule(**{**SMALL, **bad})


def _module(data, **kwargs):
    return TwoTowerModule(data.query_cardinalities, data.item_cardinalities, **kwargs)


def test_in_batch_softmax_subtracts_log_popularity_and_masks_repeated_items():
    data = small_data()
    module = _module(data, temperature=0.5)
    module.log_popularity.copy_(torch.linspace(-1, -5, SMALL["num_items"]))
    batch = next(iter(data.train_dataloader()))
    batch = {key: value[:4] for key, value in batch.items()}
    batch["target"][3] = batch["target"][1]  # item 1 occurs twice
    batch["item_features"][3] = batch["item_features"][1]
    out = module.forward_step(batch)
    q, x = module.query_tower(batch["input"]), module.item_tower(batch["item_features"])
    ids = batch["target"]
    for i in range(4):
        for j in range(4):
            expected = -math.inf if (i != j and ids[i] == ids[j]) else float(q[i].detach() @ x[j].detach() / 0.5 - module.log_popularity[ids[j]])
            assert out.logits[i, j].item() == pytest.approx(expected, rel=1e-5, abs=1e-5)
    loss = module.task_loss(out)
    by_hand = torch.stack([-F.log_softmax(out.logits[i], 0)[i] for i in range(4)])
    torch.testing.assert_close(loss, by_hand)
    plain = _module(data, temperature=0.5, popularity_correction=False)
    plain.load_state_dict(module.state_dict())
    assert torch.allclose(plain.forward_step(batch).logits[0, :3], (q[0] @ x[:3].T / 0.5))


def test_recall_at_k_counts_the_queries_whose_item_ranks_in_the_top_k():
    data = small_data()
    module = _module(data, recall_ks=(1, 2))
    module.tail_items.zero_()
    module.tail_items[2] = True
    # three items on the unit circle, two queries: item 2 ranks 1st for query 0, item 0 ranks 2nd for query 1
    module._corpus = torch.zeros(SMALL["num_items"], 2)
    module._corpus[:3] = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    queries = torch.tensor([[0.6, 0.8], [0.0, 1.0]])
    torch.testing.assert_close(module.item_ranks(queries, torch.tensor([2, 0])), torch.tensor([0, 2]))
    out = type("Out", (), {"features": queries, "extras": {"item_ids": torch.tensor([2, 1])}})()
    module.on_step_output(out, "val")
    values = module.val_metrics.compute()
    # query 1's item 1 ranks 0th (score 1.0), item 2 second (0.8)
    assert values["val/recall@1"] == 1.0 and values["val/tail_recall@1"] == 1.0
    module.val_metrics.reset()
    out.extras["item_ids"] = torch.tensor([0, 2])
    module.on_step_output(out, "val")
    values = module.val_metrics.compute()
    assert values["val/recall@1"] == 0.0 and values["val/recall@2"] == 0.5
    assert values["val/tail_recall@1"] == 0.0 and values["val/tail_recall@2"] == 1.0


def test_a_module_built_for_other_data_is_refused_at_setup():
    data = small_data()
    module = TwoTowerModule((30, 4, 3), (61, 4, 8, 3))
    with pytest.raises(ValueError, match="item_cardinalities"):
        example_trainer(max_steps=1).fit(module, datamodule=data)


def test_a_short_fit_logs_recall_overall_and_on_tail_items_and_learns(tmp_path):
    torch.manual_seed(0)
    data = small_data()
    module = _module(data, lr=0.01, recall_ks=(5,))
    trainer = example_trainer(max_epochs=3, default_root_dir=tmp_path)
    untrained = trainer.test(module, datamodule=data, verbose=False)[0]
    trainer = example_trainer(max_epochs=3, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=data)
    tested = trainer.test(module, datamodule=data, verbose=False)[0]
    assert {"test/recall@5", "test/tail_recall@5"} <= tested.keys()
    assert tested["test/recall@5"] > untrained["test/recall@5"] + 0.1
    assert torch.equal(module.item_table, data.item_features)
    top = module.predict_step(next(iter(data.test_dataloader())), 0)
    assert top.shape[1] == 5
