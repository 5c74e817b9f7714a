"""ECAML (paper 56): the energy against hand-computed cases, the loss term on the embedding module
(its value, and that its gradient reaches the embedding layer only), and the refusals."""

from __future__ import annotations

import doctest
import itertools
import math

import pytest
import torch

import reglab.callbacks.metric_learning.ecaml as ecaml_module
from reglab.callbacks.metric_learning import ECAML
from reglab.callbacks.metric_learning.ecaml import energy
from reglab.registry import example_data, example_module, example_trainer
from reglab.technique import TechniqueConfigError


def test_docstring_example_runs():
    assert doctest.testmod(ecaml_module, raise_on_error=True).attempted > 0


def test_energy_by_hand():
    points = torch.tensor([[0.0, 0.0], [3.0, 4.0], [0.0, 0.0], [1.0, 0.0]])
    labels = torch.tensor([0, 1, 1, 0])
    # pairs of different classes: (0,1) 25, (0,2) 0, (1,3) 4 + 16 = 20, (2,3) 1 -> mean 11.5, half 5.75
    assert energy(points, labels).item() == pytest.approx(5.75)
    # same-class pairs, as the official code adds them: (0,3) 1, (1,2) 25 -> mean 13, half 6.5
    assert energy(points, labels, include_positives=True).item() == pytest.approx(5.75 + 6.5)
    # every pair of different classes: the positives' part is skipped, not nan
    assert energy(points[:2], labels[:2], include_positives=True).item() == pytest.approx(12.5)
    assert energy(points[1:3], labels[1:3]).isnan()


def _step(seed: int = 0):
    module = example_module(seed, data="embedding")
    data = example_data(12, "embedding")
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    return module, batch, module.forward_step(batch)


def test_loss_term_is_weight_times_log_energy_of_the_embedding_layer():
    module, batch, out = _step()
    term = ECAML(weight=0.3).loss_terms(out, module)["energy_confusion"]
    with torch.no_grad():  # by hand: a loop over the pairs of the un-normalised embedding
        z = module.projection(module.backbone(batch["input"]))
        labels = batch["target"].tolist()
        distances = [(z[i] - z[j]).pow(2).sum().item() for i, j in itertools.combinations(range(len(z)), 2)
                     if labels[i] != labels[j]]
    assert term.item() == pytest.approx(0.3 * math.log(0.5 * sum(distances) / len(distances)), rel=1e-5)


def test_gradient_reaches_the_embedding_layer_only():
    module, _, out = _step()
    ECAML().loss_terms(out, module)["energy_confusion"].backward()
    assert module.projection.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in module.backbone.parameters())


def test_the_energys_scale_only_shifts_the_term():
    # log E: doubling the backbone features (bias zero) doubles the embedding and quadruples E, so
    # the term moves by exactly weight * log 4
    module, _, out = _step()
    with torch.no_grad():
        module.projection.bias.zero_()
    technique = ECAML(weight=1.0)
    base = technique.loss_terms(out, module)["energy_confusion"]
    out.extras["backbone_features"] = 2 * out.extras["backbone_features"]
    assert (technique.loss_terms(out, module)["energy_confusion"] - base).item() == pytest.approx(math.log(4), rel=1e-5)


def test_one_class_batch_gives_a_zero_term():
    module, _, out = _step()
    out.labels = torch.zeros_like(out.labels)
    term = ECAML().loss_terms(out, module)["energy_confusion"]
    assert term.item() == 0.0 and term.requires_grad


def test_refuses_a_bad_weight_and_a_module_without_an_embedding_layer():
    with pytest.raises(TechniqueConfigError, match="ECAML: weight must be positive, got 0"):
        ECAML(weight=0)
    trainer = example_trainer(max_steps=1, callbacks=[ECAML()])
    with pytest.raises(TechniqueConfigError, match="ECAML: ClassificationModule has no `projection` linear layer"):
        trainer.fit(example_module(0), datamodule=example_data(64))


def test_refuses_a_step_output_without_backbone_features():
    module, _, out = _step()
    out.extras.clear()
    with pytest.raises(TechniqueConfigError, match="puts no `backbone_features`"):
        ECAML().loss_terms(out, module)
