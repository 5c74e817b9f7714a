"""Each technique's math against hand-computed or reference values."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from reglab.callbacks.baselines.gce import generalized_cross_entropy
from reglab.callbacks.noisy_labels.elr import clamped_probabilities, elr_regularizer, elr_target_update
from reglab.mixins import cross_entropy_per_sample


def test_elr_target_update_matches_formula():
    targets = torch.tensor([[0.0, 0.0], [0.5, 0.5]])
    probs = torch.tensor([[0.2, 0.6], [0.9, 0.1]])  # first row unnormalised on purpose
    updated = elr_target_update(targets, probs, beta=0.7)
    expected = torch.tensor([[0.3 * 0.25, 0.3 * 0.75], [0.7 * 0.5 + 0.3 * 0.9, 0.7 * 0.5 + 0.3 * 0.1]])
    torch.testing.assert_close(updated, expected)


def test_elr_regularizer_hand_value_and_gradient_direction():
    logits = torch.tensor([[2.0, 0.0, 0.0]], requires_grad=True)
    probs = clamped_probabilities(logits)
    target = torch.tensor([[0.6, 0.2, 0.2]])
    reg = elr_regularizer(probs, target)
    p = [math.exp(2) / (math.exp(2) + 2), 1 / (math.exp(2) + 2), 1 / (math.exp(2) + 2)]
    assert math.isclose(reg.item(), math.log(1 - (0.6 * p[0] + 0.2 * p[1] + 0.2 * p[2])), rel_tol=1e-5)
    reg.backward()
    # minimising log(1 - <t, p>) raises <t, p>: the logit of the target's main class goes up
    assert logits.grad[0, 0] < 0


def test_elr_clamp_matches_official_code():
    probs = clamped_probabilities(torch.tensor([[50.0, 0.0]]))
    torch.testing.assert_close(probs, torch.tensor([[1 - 1e-4, 1e-4]]))


def test_elr_loss_equals_official_formulation():
    """The full loss of one step equals the official code's CE + lambda * reg on a random case."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 4, generator=gen)
    labels = torch.randint(0, 4, (5,), generator=gen)
    old = torch.rand(5, 4, generator=gen)
    y_pred = torch.clamp(F.softmax(logits, dim=1), 1e-4, 1.0 - 1e-4)
    new_t = 0.7 * old + 0.3 * (y_pred / y_pred.sum(dim=1, keepdim=True))
    official = F.cross_entropy(logits, labels) + 3.0 * ((1 - (new_t * y_pred).sum(dim=1)).log()).mean()
    probs = clamped_probabilities(logits)
    ours = cross_entropy_per_sample(logits, labels).mean() + 3.0 * elr_regularizer(
        probs, elr_target_update(old, probs, 0.7)
    )
    torch.testing.assert_close(ours, official)


def test_gce_limits_and_hand_value():
    logits = torch.tensor([[1.0, 0.0]])
    p = math.exp(1) / (math.exp(1) + 1)
    assert math.isclose(generalized_cross_entropy(logits, torch.tensor([0]), 0.7).item(), (1 - p**0.7) / 0.7, rel_tol=1e-5)
    assert math.isclose(generalized_cross_entropy(logits, torch.tensor([0]), 1.0).item(), 1 - p, rel_tol=1e-5)
    ce = F.cross_entropy(logits, torch.tensor([0])).item()
    assert math.isclose(generalized_cross_entropy(logits, torch.tensor([0]), 1e-4).item(), ce, rel_tol=1e-3)


def test_soft_cross_entropy_matches_torch():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 5, generator=gen)
    soft = torch.rand(6, 5, generator=gen).softmax(-1)
    torch.testing.assert_close(
        cross_entropy_per_sample(logits, soft), F.cross_entropy(logits, soft, reduction="none")
    )
