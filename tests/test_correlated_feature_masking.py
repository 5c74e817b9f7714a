"""Correlated feature masking (paper 27): mutual information, the masks and the SSL loss against
hand-computed cases, the loss term on the two-tower model, and the refusal of other models."""

from __future__ import annotations

import doctest
import math

import pytest
import torch
import torch.nn.functional as F

import reglab.callbacks.metric_learning.correlated_feature_masking as cfm_module
from reglab.callbacks.metric_learning import CorrelatedFeatureMasking
from reglab.callbacks.metric_learning.correlated_feature_masking import (
    correlated_mask,
    mutual_information,
    view_contrastive_loss,
)
from reglab.registry import example_data, example_module, example_trainer
from reglab.technique import TechniqueConfigError


def test_docstring_example_runs():
    assert doctest.testmod(cfm_module, raise_on_error=True).attempted > 0


def test_mutual_information_by_hand():
    # columns: a fair coin, a copy of it, an independent fair coin, a constant
    features = torch.tensor([[0, 0, 0, 5], [0, 0, 1, 5], [1, 1, 0, 5], [1, 1, 1, 5]])
    information = mutual_information(features)
    log2 = math.log(2)
    assert information[0, 1].item() == pytest.approx(log2) and information[0, 0].item() == pytest.approx(log2)
    assert information[0, 2].item() == pytest.approx(0.0, abs=1e-12)
    assert information[3].abs().max().item() == pytest.approx(0.0, abs=1e-12)
    # a 3-valued column against a coin that tells value 0 from {1, 2}: MI = H(coin)
    skewed = torch.tensor([[0, 0], [1, 1], [2, 1], [0, 0]])
    h = -(0.5 * math.log(0.5)) * 2
    assert mutual_information(skewed)[0, 1].item() == pytest.approx(h)
    assert torch.equal(information, information.T)


def test_the_correlated_mask_takes_the_seed_and_the_fields_most_informative_about_it():
    information = torch.tensor([[2.0, 0.1, 1.5, 0.3],
                                [0.1, 1.0, 0.2, 0.9],
                                [1.5, 0.2, 3.0, 0.4],
                                [0.3, 0.9, 0.4, 1.2]])
    assert correlated_mask(information, 0, 2).tolist() == [True, False, True, False]
    # the seed is masked even when another field's entropy is larger than its MI with it
    assert correlated_mask(information, 1, 2).tolist() == [False, True, False, True]
    assert correlated_mask(information, 3, 1).tolist() == [False, False, False, True]


def test_view_contrastive_loss_by_hand():
    first = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]), dim=1)
    second = F.normalize(torch.tensor([[1.0, 0.2], [0.3, 1.0], [1.0, 0.0]]), dim=1)
    tau = 0.5
    expected = 0.0
    for i in range(3):
        scores = [float(first[i] @ second[j]) / tau for j in range(3)]
        expected -= scores[i] - math.log(sum(math.exp(s) for s in scores))
    assert view_contrastive_loss(first, second, tau).item() == pytest.approx(expected / 3, rel=1e-6)


def test_the_two_views_mask_complementary_halves_and_the_loss_reaches_the_item_tower():
    data = example_data(64, "recommendation")
    data.setup("fit")
    module = example_module(0, data="recommendation")
    module.item_table.copy_(data.item_features)
    technique = CorrelatedFeatureMasking(weight=2.0, temperature=0.1)
    technique.information = mutual_information(data.item_features)
    seen = set()
    for _ in range(20):
        mask = technique.masks(4)
        assert mask.sum() == 2
        seen.add(tuple(mask.tolist()))
    # the seed field is drawn per batch, so the halves change from batch to batch
    assert len(seen) > 1
    random = CorrelatedFeatureMasking(masking="random")
    assert all(random.masks(4).sum() == 2 for _ in range(5))
    batch = next(iter(data.train_dataloader()))
    out = module.forward_step(batch)
    term = technique.loss_terms(out, module)["ssl"]
    term.backward()
    assert module.item_tower.embeddings[0].weight.grad.abs().sum() > 0
    assert module.query_tower.embeddings[0].weight.grad is None
    # the masked fields' default rows (the last of each table) are trained by the SSL loss
    assert any(table.weight.grad[-1].abs().sum() > 0 for table in module.item_tower.embeddings)


def test_a_model_without_an_item_tower_is_refused_at_setup():
    with pytest.raises(TechniqueConfigError, match="TwoTowerModule"):
        example_trainer(max_steps=1, callbacks=[CorrelatedFeatureMasking()]).fit(example_module(), datamodule=example_data())


@pytest.mark.parametrize("bad", [{"temperature": 0.0}, {"mask_fraction": 1.0}, {"masking": "rfm"}])
def test_bad_arguments_are_refused(bad):
    with pytest.raises(ValueError, match="CorrelatedFeatureMasking"):
        CorrelatedFeatureMasking(**bad)
