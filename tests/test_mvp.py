"""MVP (paper 16): each piece against a hand computation or autograd on a small linear head."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from reglab.callbacks import MVP, LabelSmoothing
from reglab.callbacks.continual.mvp import (
    compensation_scores,
    ignorance_scores,
    mask_absent_classes,
    masked_cross_entropy,
    scaled_feature_logits,
    unmasked_targets,
)
from harness import noisy_digits, quiet_trainer
from reglab.mixins import StepOutput
from reglab.tasks import ClassificationModule
from reglab.technique import TechniqueConfigError

LABELS = torch.tensor([0, 2, 2, 4, 0, 2])


def linear_head(seed: int = 0, classes: int = 5, dim: int = 3) -> torch.nn.Linear:
    torch.manual_seed(seed)
    return torch.nn.Linear(dim, classes)


def test_instance_mask_keeps_only_the_batch_classes():
    masked = mask_absent_classes(torch.zeros(6, 5), LABELS)
    assert torch.isinf(masked[:, [1, 3]]).all() and (masked[:, [0, 2, 4]] == 0).all()


def test_ignorance_scores_match_per_sample_autograd_of_the_head():
    """The official procedure: backward each sample's CE (and the mean CE) through a copy of the
    head and compare the gradients on the sample's class row."""
    head = linear_head()
    features = torch.randn(6, 3, generator=torch.Generator().manual_seed(1))
    logits = mask_absent_classes(head(features), LABELS)
    sample_grads = []
    for i in range(len(LABELS)):
        (grad,) = torch.autograd.grad(F.cross_entropy(logits[i : i + 1], LABELS[i : i + 1]), head.weight, retain_graph=True)
        sample_grads.append(grad[LABELS[i]])
    (batch_grad,) = torch.autograd.grad(F.cross_entropy(logits, LABELS), head.weight)
    expected = 1 - F.cosine_similarity(torch.stack(sample_grads), batch_grad[LABELS], dim=-1)

    probs, targets = logits.detach().softmax(-1), F.one_hot(LABELS, 5).float()
    torch.testing.assert_close(ignorance_scores(probs, targets, LABELS, features), expected)


def test_compensation_score_by_hand():
    weight = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    features = torch.tensor([[3.0, 0.0], [1.0, 1.0]])
    # sample 0 lies on its class row (cos 1), sample 1 at 45 degrees to row 1 (cos 1/sqrt 2)
    expected = torch.tensor([0.0 + 0.5, 1 - 1 / math.sqrt(2) + 0.5])
    torch.testing.assert_close(compensation_scores(weight, torch.tensor([0, 1]), features, 0.5), expected)


def test_scaled_feature_logits_are_the_head_of_scaled_features():
    head, features = linear_head(), torch.randn(6, 3)
    scale = torch.rand(6) + 0.5
    expected = head(features / scale.unsqueeze(-1))
    torch.testing.assert_close(scaled_feature_logits(head(features), head.bias, scale), expected)
    masked = scaled_feature_logits(mask_absent_classes(head(features), LABELS), head.bias, scale)
    assert torch.isinf(masked[:, 1]).all() and torch.isfinite(masked[:, 0]).all()


def test_soft_targets_on_masked_classes_are_renormalised():
    logits = torch.tensor([[1.0, float("-inf"), 0.0]])
    targets = unmasked_targets(torch.tensor([[0.6, 0.2, 0.2]]), logits)
    torch.testing.assert_close(targets, torch.tensor([[0.75, 0.0, 0.25]]))
    log_p = torch.tensor([1.0, 0.0]).log_softmax(-1)
    expected = -(0.75 * log_p[0] + 0.25 * log_p[1])
    torch.testing.assert_close(masked_cross_entropy(logits, targets), expected.reshape(1))


def mvp_step(head, features, technique):
    module = SimpleNamespace(head=head)
    out = StepOutput(logits=head(features), target=LABELS, features=features)
    return technique.task_loss(technique.transform_outputs(out, module), module)


def test_task_loss_is_the_per_sample_focal_weighted_ce_of_scaled_features():
    head, features = linear_head(), torch.randn(6, 3, generator=torch.Generator().manual_seed(2))
    alpha, gamma, margin = 0.5, 2.0, 0.5
    loss = mvp_step(head, features, MVP(alpha=alpha, gamma=gamma, margin=margin))

    present = torch.tensor([True, False, True, False, True])
    with torch.no_grad():
        cos = F.cosine_similarity(head.weight[LABELS], features, dim=-1)
        scores = ignorance_scores(head(features).masked_fill(~present, -math.inf).softmax(-1),
                                  F.one_hot(LABELS, 5).float(), LABELS, features)
    scaled = head(features / (1 - cos + margin).unsqueeze(-1))[:, present]
    ce = F.cross_entropy(scaled, torch.tensor([0, 1, 1, 2, 0, 1]), reduction="none")
    expected = ((1 - alpha) + alpha * scores**gamma) * ce
    torch.testing.assert_close(loss, expected)
    # per sample, not the official batch-mean CE times each weight
    assert not torch.allclose(loss, ((1 - alpha) + alpha * scores**gamma) * ce.mean())


def test_every_part_off_is_plain_cross_entropy_and_loss_reaches_the_head():
    head, features = linear_head(), torch.randn(6, 3)
    plain = mvp_step(head, features, MVP(alpha=0.0, instance_mask=False, feature_scaling=False))
    torch.testing.assert_close(plain, F.cross_entropy(head(features), LABELS, reduction="none"))
    mvp_step(head, features, MVP()).mean().backward()
    assert head.weight.grad[[1, 3]].abs().sum() == 0 and head.weight.grad[[0, 2, 4]].abs().sum() > 0


@pytest.mark.parametrize("kwargs, problem", [
    (dict(alpha=1.5), "alpha"), (dict(gamma=-1.0), "gamma"), (dict(margin=0.0), "margin"),
])
def test_bad_arguments_are_refused(kwargs, problem):
    with pytest.raises(TechniqueConfigError, match=f"MVP: {problem}"):
        MVP(**kwargs)


def test_a_module_without_a_linear_head_is_refused_at_setup():
    module = ClassificationModule("mlp", num_classes=10, input_shape=(64,), backbone_kwargs={"hidden_sizes": (8,)})
    module.head = torch.nn.Sequential(torch.nn.Linear(8, 10))
    with pytest.raises(TechniqueConfigError, match="nn.Linear `head`"):
        quiet_trainer(max_steps=1, callbacks=[MVP()]).fit(module, datamodule=noisy_digits())


def test_label_smoothing_partner_trains_finitely():
    module = ClassificationModule("mlp", num_classes=10, input_shape=(64,), backbone_kwargs={"hidden_sizes": (8,)})
    trainer = quiet_trainer(max_steps=2, callbacks=[MVP(), LabelSmoothing(0.1)])
    trainer.fit(module, datamodule=noisy_digits(batch_size=8))
    assert math.isfinite(float(trainer.callback_metrics["train/loss"]))
