"""LegoGCD's terms against hand-computed values, its class prior and its set-up checks."""

from __future__ import annotations

import doctest
import math
from types import SimpleNamespace

import pytest
import torch

from reglab.callbacks.category_discovery import lego_gcd
from reglab.callbacks.category_discovery.lego_gcd import LegoGCD, confident_known, dual_view_kl, local_entropy
from reglab.tasks import ClassificationModule, DiscoveryModule
from reglab.technique import TechniqueConfigError


def test_mask_keeps_unlabelled_rows_confidently_in_a_known_class():
    # softmax([log 3, 0, 0]) = (0.6, 0.2, 0.2); softmax([log 8, 0, 0]) = (0.8, 0.1, 0.1)
    logits = torch.tensor([[math.log(8), 0, 0], [math.log(3), 0, 0], [0, 0, math.log(8)], [math.log(8), 0, 0]])
    unlabelled = torch.tensor([True, True, True, False])
    # row 0: 0.8 on known class 0; row 1: 0.6 < 0.7; row 2: 0.8 on novel class 2; row 3: labelled
    assert confident_known(logits, unlabelled, 0.7, num_known_classes=2).tolist() == [True, False, False, False]
    assert confident_known(logits, unlabelled, 0.55, num_known_classes=2).tolist() == [True, True, False, False]
    assert confident_known(logits, unlabelled, 0.7, num_known_classes=3).tolist() == [True, False, True, False]


def test_local_entropy_by_hand():
    cosine = torch.zeros(2, 2)
    mask = torch.tensor([True, False])
    # p = (1/2, 1/2); a uniform prior does not move q: -sum p log q = log 2, on one of two rows
    assert local_entropy(cosine, mask, 0.05, torch.full((2,), 0.5).log(), 0.4).item() == pytest.approx(math.log(2) / 2)
    # prior (0.8, 0.2) at debias 1: q = (0.8, 0.2), -(log 0.8 + log 0.2) / 2 = 0.9163, on one of two rows
    prior = torch.tensor([0.8, 0.2]).log()
    assert local_entropy(cosine, mask, 0.05, prior, 1.0).item() == pytest.approx(0.5 * 0.5 * -(math.log(0.8) + math.log(0.2)))
    # debias 0 is the plain entropy at the temperature: cosine (0.05 log 3, 0) / 0.05 -> p = (3/4, 1/4)
    sharp = torch.tensor([[0.05 * math.log(3), 0.0]])
    entropy = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert local_entropy(sharp, torch.tensor([True]), 0.05, prior, 0.0).item() == pytest.approx(entropy)


def test_dual_view_kl_by_hand():
    # view 1 (3/4, 1/4), view 2 (1/2, 1/2): 0.75 log 1.5 + 0.25 log 0.5
    logits = torch.tensor([[math.log(3), 0.0], [0.0, 0.0]])
    assert dual_view_kl(logits).item() == pytest.approx(0.75 * math.log(1.5) + 0.25 * math.log(0.5))
    assert dual_view_kl(logits.flip(0)).item() == pytest.approx(0.5 * math.log(2 / 3) + 0.5 * math.log(2))


def tiny_module_and_batch():
    """A 4-class (2 known) DiscoveryModule on 4 features and a two-view batch of 2 labelled, 4 unlabelled rows."""
    torch.manual_seed(0)
    module = DiscoveryModule("mlp", input_shape=(4,), num_classes=4, num_known_classes=2,
                             backbone_kwargs={"hidden_sizes": (8,)}, projection_dim=4, projection_hidden_dim=8)
    batch = {"view1": torch.randn(6, 4), "view2": torch.randn(6, 4), "target": torch.tensor([0, 1, -1, -1, -1, -1]),
             "labelled": torch.tensor([True, True, False, False, False, False])}
    return module, batch


def test_terms_are_weighted_and_the_prior_follows_the_batches():
    module, batch = tiny_module_and_batch()
    technique = LegoGCD(threshold=0.3, ler_weight=2.0, prior_momentum=0.9)
    technique.qhat = torch.full((4,), 0.25)
    out = module.forward_step(batch)
    terms = technique.loss_terms(out, module)
    mask = confident_known(out.logits, ~out.extras["labelled"], 0.3, 2)
    expected_ler = local_entropy(out.extras["cosine"], mask, 0.05, torch.full((4,), 0.25).log(), 0.4)
    torch.testing.assert_close(terms["ler"], 2.0 * expected_ler)
    torch.testing.assert_close(terms["dkl"], (1 - 0.35) * dual_view_kl(out.logits))
    assert terms["dkl"].requires_grad and terms["ler"].requires_grad

    identity = SimpleNamespace(strategy=SimpleNamespace(reduce=lambda tensor, reduce_op: tensor))
    technique.on_train_batch_end(identity, module, {"step_output": out.detached()}, batch, 0)
    batch_mean = out.extras["cosine"].detach().softmax(-1).mean(0)
    torch.testing.assert_close(technique.qhat, 0.9 * 0.25 + 0.1 * batch_mean)
    restored = LegoGCD()
    restored.load_state_dict(technique.state_dict())
    torch.testing.assert_close(restored.qhat, technique.qhat)


def test_refuses_bad_arguments_and_other_modules():
    with pytest.raises(TechniqueConfigError, match="threshold"):
        LegoGCD(threshold=0.0)
    with pytest.raises(TechniqueConfigError, match="prior_momentum"):
        LegoGCD(prior_momentum=1.0)
    with pytest.raises(TechniqueConfigError, match="DiscoveryModule"):
        LegoGCD().setup(None, ClassificationModule("mlp", num_classes=3, input_shape=(4,)), "fit")


def test_docstring_examples_run():
    result = doctest.testmod(lego_gcd, verbose=False)
    assert result.attempted >= 4 and result.failed == 0, result
