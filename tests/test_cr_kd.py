"""Cr-KD's loss against hand-computed values, its frozen teacher and its set-up checks."""

from __future__ import annotations

import doctest
import math

import lightning as L
import pytest
import torch

from reglab.callbacks.category_discovery import cr_kd
from reglab.callbacks.category_discovery.cr_kd import CrKD, class_relation_kd
from reglab.tasks import ClassificationModule
from reglab.technique import TechniqueConfigError
from test_lego_gcd import tiny_module_and_batch


def test_class_relation_kd_by_hand():
    teacher = torch.tensor([[math.log(3), 0.0], [math.log(3), 0.0]])  # relation (3/4, 1/4)
    # both rows' known part is (3/4, 1/4); the novel logit gives known-class mass 3/5 and 4/5 (mean 7/10)
    student = torch.tensor([[math.log(3), 0.0, math.log(8 / 3)], [math.log(3), 0.0, math.log(1)]])
    cross_entropy = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    expected = [cross_entropy * (0.6 / 0.7), cross_entropy * (0.8 / 0.7)]
    torch.testing.assert_close(class_relation_kd(teacher, student, 2, 1.0), torch.tensor(expected))
    # at T = 2 the same distributions come from doubled logits, and the loss is scaled by T^2
    torch.testing.assert_close(class_relation_kd(2 * teacher, 2 * student, 2, 2.0), 4 * torch.tensor(expected))


def _set_up(technique, module):
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_checkpointing=False, callbacks=[technique])
    technique.setup(trainer, module, "fit")
    technique.on_fit_start(trainer, module)


def test_distils_from_the_model_as_the_fit_started():
    module, batch = tiny_module_and_batch()
    technique = CrKD(alpha=0.5, temperature=4.0)
    _set_up(technique, module)
    out = module.forward_step(batch)
    unlabelled = ~out.extras["labelled"]
    # the teacher is a copy of the model at the fit's start: its known-class logits are the model's
    student = out.logits[unlabelled]
    expected = 0.5 * class_relation_kd(student[:, :2], student, 2, 4.0).mean()
    torch.testing.assert_close(technique.loss_terms(out, module)["kd"], expected)

    before = technique.teacher_logits(torch.cat([batch["view1"], batch["view2"]]), module)
    with torch.no_grad():
        module.classifier.weight.add_(1.0)
    after = technique.teacher_logits(torch.cat([batch["view1"], batch["view2"]]), module)
    torch.testing.assert_close(after, before)  # frozen: the model's training does not move it

    restored = CrKD()
    restored.load_state_dict(technique.state_dict())  # before the fit: applied when the teacher is built
    fresh, _ = tiny_module_and_batch()
    with torch.no_grad():
        fresh.classifier.weight.mul_(-1.0)
    _set_up(restored, fresh)
    torch.testing.assert_close(restored.teacher_logits(batch["view1"], fresh), technique.teacher_logits(batch["view1"], module))


def test_refuses_bad_arguments_and_other_modules():
    with pytest.raises(TechniqueConfigError, match="temperature"):
        CrKD(temperature=0.0)
    with pytest.raises(TechniqueConfigError, match="alpha"):
        CrKD(alpha=-1.0)
    with pytest.raises(TechniqueConfigError, match="DiscoveryModule"):
        CrKD().setup(None, ClassificationModule("mlp", num_classes=3, input_shape=(4,)), "fit")


def test_docstring_examples_run():
    result = doctest.testmod(cr_kd, verbose=False)
    assert result.attempted >= 4 and result.failed == 0, result
