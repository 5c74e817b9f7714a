"""DR-Tune's maths against hand-computed cases: the Procrustes rotation, the class-level translation,
the queue, and which parameters the distribution term trains."""

from __future__ import annotations

import math

import pytest
import torch

from reglab import registry
from reglab.callbacks import DRTune
from reglab.callbacks.domain_generalization.dr_tune import rotation_alignment, semantic_calibration
from reglab.mixins import StepOutput
from reglab.technique import TechniqueConfigError


def test_rotation_alignment_recovers_a_rotation_and_a_shift():
    square = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0], [0.5, 0.0]])
    # 90 degrees counter-clockwise: (x, y) -> (-y, x), then moved by (2, 3)
    target = torch.stack([-square[:, 1], square[:, 0]], 1) + torch.tensor([2.0, 3.0])
    torch.testing.assert_close(rotation_alignment(square, target), target)


def test_rotation_alignment_never_reflects():
    points = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-1.0, 0.0], [0.0, -2.0], [3.0, 1.0]])
    mirrored = points * torch.tensor([-1.0, 1.0])
    aligned = rotation_alignment(points, mirrored)
    # a proper rotation keeps the orientation: the signed area of the first three points stays positive
    def signed_area(p):
        return float((p[1, 0] - p[0, 0]) * (p[2, 1] - p[0, 1]) - (p[1, 1] - p[0, 1]) * (p[2, 0] - p[0, 0]))

    assert signed_area(points) > 0 and signed_area(mirrored) < 0 and signed_area(aligned) > 0
    assert not torch.allclose(aligned, mirrored)
    # distances between points are kept
    torch.testing.assert_close(torch.cdist(aligned, aligned), torch.cdist(points, points))


def test_class_translation_moves_the_class_mean_onto_the_confidence_weighted_centre():
    pretrained = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    fine_tuned = torch.tensor([[2.0, 0.0], [0.0, 3.0]])  # normalised to the unit vectors
    prototypes = torch.tensor([[5.0, 0.0]])  # class 0 points along x
    # cosines 1 and 0: weights e / (1 + e) = 0.7310586 and 0.2689414; the pretrained mean is (0.5, 0.5),
    # so both rows move by (0.2310586, -0.2310586), and are then normalised and scaled to 2
    moved = torch.tensor([[1.2310586, -0.2310586], [0.2310586, 0.7689414]])
    expected = 2 * moved / moved.norm(dim=1, keepdim=True)
    calibrated = semantic_calibration(pretrained, fine_tuned, torch.tensor([0, 0]), prototypes, torch.tensor(2.0),
                                      rotate=False)
    torch.testing.assert_close(calibrated, expected)


def test_each_class_is_translated_on_its_own():
    pretrained = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    fine_tuned = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    prototypes = torch.eye(2)
    # one image per class: each pretrained row lands on its class's fine-tuned row
    calibrated = semantic_calibration(pretrained, fine_tuned, torch.tensor([0, 1]), prototypes, torch.tensor(1.0),
                                      rotate=False)
    torch.testing.assert_close(calibrated, fine_tuned)


class _Module(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.backbone, self.head = torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)
        self.global_step = 0

    def forward_step(self, batch):
        features = self.backbone(batch["input"])
        return StepOutput(logits=self.head(features), target=batch["target"], features=features, batch=batch)


def test_the_queue_is_a_ring_of_the_most_recent_images_and_the_default_weight_is_its_length_over_the_batch():
    technique, module = DRTune(queue_size=3), _Module()
    technique.on_fit_start(None, module)
    out = module.forward_step({"input": torch.randn(2, 3), "target": torch.tensor([0, 1])})
    assert float(technique.loss_terms(out, module)["distribution"]) == 0.0  # nothing queued yet
    for step in range(2):  # 4 images into 3 slots: the first is overwritten by the fourth
        technique.enqueue(torch.full((2, 4), float(step)), torch.full((2, 4), 10.0 + step),
                          torch.tensor([step, step]), module)
    queue = technique.queue
    assert queue["labels"].tolist() == [1, 0, 1] and int(queue["position"]) == 1 and int(queue["filled"]) == 3
    assert queue["pretrained"][:, 0].tolist() == [1.0, 0.0, 1.0]
    term = technique.loss_terms(out, module)["distribution"]
    with torch.no_grad():
        calibrated = semantic_calibration(queue["pretrained"], queue["fine_tuned"], queue["labels"], module.head.weight,
                                          out.features.norm(dim=1).mean())
        expected = 3 / 2 * torch.nn.functional.cross_entropy(module.head(calibrated), queue["labels"])
    torch.testing.assert_close(term, expected)


def test_the_distribution_term_trains_the_head_only():
    technique, module = DRTune(queue_size=8), _Module()
    technique.on_fit_start(None, module)
    technique.enqueue(torch.randn(4, 4), torch.randn(4, 4), torch.tensor([0, 1, 0, 1]), module)
    out = module.forward_step({"input": torch.randn(2, 3), "target": torch.tensor([0, 1])})
    technique.loss_terms(out, module)["distribution"].backward()
    assert module.backbone.weight.grad is None
    assert module.head.weight.grad.abs().sum() > 0


def test_the_pretrained_features_come_from_the_snapshot_in_eval_mode_and_leave_the_modes_alone():
    technique, module = DRTune(), _Module()
    module.backbone = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Dropout(0.9))
    module.train()
    technique.on_fit_start(None, module)
    batch = {"input": torch.randn(5, 3), "target": torch.zeros(5, dtype=torch.long)}
    expected = module.backbone[0](batch["input"])  # the weights at fit start, without dropout
    with torch.no_grad():
        module.backbone[0].weight.add_(1.0)  # fine-tuning moves the weights
    torch.testing.assert_close(technique.pretrained_features(module, batch), expected.detach())
    assert module.training and module.backbone[1].training


def test_a_module_without_a_linear_head_is_refused_at_setup():
    module = registry.example_module()
    module.head = torch.nn.Identity()
    trainer = registry.example_trainer(max_steps=1, callbacks=[DRTune()])
    with pytest.raises(TechniqueConfigError, match="no `head` with a .classes, features. weight"):
        trainer.fit(module, datamodule=registry.example_data())


def test_bad_arguments_are_refused():
    for kwargs in ({"queue_size": 0}, {"weight": -1.0}, {"rotation_every": 0}):
        with pytest.raises(ValueError, match="DRTune"):
            DRTune(**kwargs)
    assert math.isclose(DRTune().queue_size, 2048)
