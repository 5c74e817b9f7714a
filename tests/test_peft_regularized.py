"""The formulas of Regularized Mask Tuning (#36), PEGO (#11) and BA-LoRA (#23) against hand
computations on tiny tensors, and their layers against the plain weights they stand for."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from reglab.callbacks.peft import PEGO, BALoRA, RegularizedMaskTuning
from reglab.callbacks.peft.ba_lora import adapters_off, consistency_loss, diversity_loss, top_k_singular_loss
from reglab.callbacks.peft.mask_tuning import (
    MaskedLayer,
    binarize,
    keep_probability,
    running_stats_kept,
    soft_cross_entropy,
)
from reglab.callbacks.peft.pego import orthogonality_penalty
from reglab.tasks import ClassificationModule


def mlp_module(seed: int = 0) -> ClassificationModule:
    torch.manual_seed(seed)
    return ClassificationModule("mlp", num_classes=3, input_shape=(4,), backbone_kwargs={"hidden_sizes": (5,)})


# -- Regularized Mask Tuning ----------------------------------------------------------------------

def test_binarize_thresholds_forward_and_passes_gradient_straight_through():
    mask = torch.tensor([1e-2, 5e-3, 4e-3, -1.0], requires_grad=True)
    hard = binarize(mask, 5e-3)
    assert hard.tolist() == [1.0, 0.0, 0.0, 0.0]  # strictly above the threshold, as the official Binarizer
    (hard * torch.tensor([1.0, 2.0, 3.0, 4.0])).sum().backward()
    assert mask.grad.tolist() == [1.0, 2.0, 3.0, 4.0]


def test_keep_probability_by_hand():
    task = torch.tensor([1.0, 1.0, -2.0, 0.5, 3.0])
    kl = torch.tensor([1.0, -1.0, 3.0, -0.25, 0.0])
    # same sign: 1; opposite and equal: 1/2; -1*(1)/5 = -0.2 -> 0.4; 1*(0.25)/0.75 -> 2/3; b = 0: 1
    expected = torch.tensor([1.0, 0.5, 0.4, 2 / 3, 1.0])
    torch.testing.assert_close(keep_probability(task, kl), expected, atol=1e-6, rtol=0)


def test_soft_cross_entropy_by_hand():
    logits = torch.tensor([[0.0, math.log(3.0)]])
    expected = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert soft_cross_entropy(logits, logits).item() == pytest.approx(expected, abs=1e-6)


def test_masked_layer_uses_the_binary_mask_and_merges_to_the_same_outputs():
    torch.manual_seed(0)
    layer = MaskedLayer(nn.Linear(3, 2), mask_init=1e-2, threshold=5e-3)
    x = torch.randn(4, 3)
    torch.testing.assert_close(layer(x), layer.base_layer(x))  # every mask starts above the threshold
    with torch.no_grad():
        layer.mask[0, 1] = 0.0
        layer.mask[1, 2] = 4e-3
    weight = layer.base_layer.weight.detach().clone()
    weight[0, 1] = weight[1, 2] = 0.0
    expected = x @ weight.T + layer.base_layer.bias
    torch.testing.assert_close(layer(x), expected)
    layer.merge()
    torch.testing.assert_close(layer(x), expected)
    torch.testing.assert_close(layer.get_base_layer().weight, weight)


def test_mask_penalty_is_the_sum_of_l2_norms():
    technique = RegularizedMaskTuning(mask_weight=1e-4, gradient_dropout=False)
    module = mlp_module()
    technique.prepare(module)
    # hidden 4 -> 5 (20 masks at 1e-2); the head (5 -> 3) has none
    assert len(technique.layers) == 1 and technique.parameter_counts["trainable"] == 20 + 5 * 3 + 3
    terms = technique.loss_terms(None, module)
    assert terms["mask_l2"].item() == pytest.approx(1e-4 * 1e-2 * math.sqrt(20), rel=1e-5)


def test_gradient_dropout_keeps_elements_with_probability_p():
    technique = RegularizedMaskTuning()
    module = nn.Sequential(nn.Linear(3, 2))
    technique.inject(module, ["0"], trainer=None)
    mask = technique.layers[0].mask
    task_grad = torch.tensor([[1.0, -1.0, 2.0], [0.5, -3.0, 1.0]])
    kl_grad = torch.tensor([[1.0, -2.0, -2.0], [-1.5, 1.0, -3.0]])  # P = 1, 1, 1/2, 1/4, 3/8, 1/4
    technique._kl_grads = {0: kl_grad}
    torch.manual_seed(3)
    (mask * task_grad).sum().backward()
    torch.manual_seed(3)
    draws = torch.rand_like(task_grad)
    expected = task_grad * (keep_probability(task_grad, kl_grad) > draws)
    torch.testing.assert_close(mask.grad, expected, rtol=0, atol=0)
    assert mask.grad[0, :2].tolist() == [1.0, -1.0]  # agreeing signs are always kept
    assert technique._kl_grads == {}  # used once: the next backward passes through
    mask.grad = None
    (mask * task_grad).sum().backward()
    torch.testing.assert_close(mask.grad, task_grad)


def test_kl_gradient_is_zero_before_any_mask_moves():
    """At the start the masked model is the pretrained one: nothing is dropped."""
    technique = RegularizedMaskTuning()
    module = mlp_module()
    technique.prepare(module)
    module.train()
    batch = {"input": torch.randn(6, 4), "target": torch.randint(0, 3, (6,))}
    out = module.forward_step(batch)
    technique.loss_terms(out, module)
    assert technique._kl_grads and all(g.abs().max() < 1e-6 for g in technique._kl_grads.values())


def test_running_stats_are_left_alone():
    norm = nn.BatchNorm1d(3)
    with running_stats_kept(norm):
        norm(torch.randn(8, 3) + 5)
    assert norm.running_mean.abs().max() == 0 and norm.num_batches_tracked.item() == 0
    norm(torch.randn(8, 3) + 5)
    assert norm.running_mean.abs().max() > 0  # outside the block they move as usual


@pytest.mark.parametrize("make", [RegularizedMaskTuning, lambda: BALoRA(r=2)], ids=["mask_tuning", "ba_lora"])
def test_reference_forward_keeps_batchnorm_statistics_and_the_graph(make):
    """The frozen model's forward between the training forward and its backward (a CNN with
    BatchNorm) must neither move the running statistics nor invalidate the saved graph."""
    torch.manual_seed(0)
    module = ClassificationModule("cnn", num_classes=3, input_shape=(1, 8, 8))
    technique = make()
    technique.prepare(module)
    module.train()
    out = module.forward_step({"input": torch.randn(6, 1, 8, 8), "target": torch.randint(0, 3, (6,))})
    stats = {n: b.clone() for n, b in module.named_buffers() if "running" in n}
    total = module.task_loss(out).mean() + sum(technique.loss_terms(out, module).values())
    total.backward()
    for name, value in stats.items():
        torch.testing.assert_close(module.get_buffer(name), value, rtol=0, atol=0)


def test_mask_tuning_rejects_masks_starting_switched_off():
    with pytest.raises(ValueError, match="mask_init"):
        RegularizedMaskTuning(mask_init=1e-3, threshold=5e-3)


# -- PEGO -----------------------------------------------------------------------------------------

def test_orthogonality_penalty_by_hand():
    weight = torch.eye(2)
    first = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    second = torch.tensor([[0.0, 0.0], [3.0, -1.0]])
    # |W first^T| = 3, |W second^T| = 4, |first second^T| = |[[0, 1], [0, 0]]| = 1
    assert orthogonality_penalty(weight, [first, second]).item() == 8.0


def test_pego_layer_is_the_sum_of_its_adapters_and_its_penalty_matches():
    technique = PEGO(num_adapters=3, r=2, lam=1e-3)
    module = mlp_module()
    technique.prepare(module)
    (name,) = [n for n, m in module.named_modules() if hasattr(m, "lora_A")]
    layer = module.get_submodule(name)
    assert sorted(layer.lora_A) == ["pego_0", "pego_1", "pego_2"]
    assert technique.parameter_counts["trainable"] == 3 * 2 * (4 + 5) + 5 * 3 + 3
    for adapter in layer.lora_B.values():
        nn.init.normal_(adapter.weight)
    updates = [layer.lora_B[a].weight @ layer.lora_A[a].weight for a in technique.adapter_names]  # alpha / r = 1
    weight = layer.base_layer.weight
    x = torch.randn(4, 4)
    torch.testing.assert_close(layer(x), x @ (weight + sum(updates)).T + layer.base_layer.bias)
    hand = sum((weight @ u.T).abs().sum() for u in updates)
    hand = hand + sum((updates[i] @ updates[j].T).abs().sum() for i in range(3) for j in range(i + 1, 3))
    out = module.forward_step({"input": x, "target": torch.zeros(4, dtype=torch.long)})
    torch.testing.assert_close(technique.loss_terms(out, module)["orthogonality"], 1e-3 * hand)
    before = module(x)
    assert technique.merge(module) == 1
    torch.testing.assert_close(module(x), before, atol=1e-5, rtol=1e-5)


# -- BA-LoRA --------------------------------------------------------------------------------------

def test_consistency_by_hand():
    outputs = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    base = torch.tensor([[4.0, 3.0], [0.0, 1.0]])
    # normalised: [[.6, .8], [1, 0]] vs [[.8, .6], [0, 1]] -> squares .04, .04, 1, 1 -> mean .52
    assert consistency_loss(outputs, base).item() == pytest.approx(0.52, abs=1e-6)


def test_diversity_by_hand():
    outputs = torch.tensor([[1.0, 2.0], [3.0, 0.0], [5.0, 4.0]])
    # centred [[-2, 0], [0, -2], [2, 2]] -> C = [[4, 2], [2, 4]] -> (2^2 + 2^2) / d = 8 / 2
    assert diversity_loss(outputs).item() == pytest.approx(4.0, abs=1e-6)


@pytest.mark.parametrize(("k", "expected"), [(1, -3 / 6), (2, -5 / 6), (5, -1.0)])
def test_top_k_singular_ratio_by_hand(k, expected):
    outputs = torch.tensor([[0.0, 2.0, 0.0], [3.0, 0.0, 0.0], [0.0, 0.0, 1.0]])  # singular values 3, 2, 1
    assert top_k_singular_loss(outputs, k).item() == pytest.approx(expected, abs=1e-6)


def test_adapters_off_gives_the_base_model_and_leaves_requires_grad_alone():
    technique = BALoRA(r=2)
    module = mlp_module()
    technique.prepare(module)
    (name,) = [n for n, m in module.named_modules() if hasattr(m, "lora_A")]
    layer = module.get_submodule(name)
    nn.init.normal_(layer.lora_B["default"].weight)
    x = torch.randn(3, 4)
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    with adapters_off(module):
        torch.testing.assert_close(layer(x), layer.base_layer(x))
    assert not torch.allclose(layer(x), layer.base_layer(x))
    assert trainable == {n for n, p in module.named_parameters() if p.requires_grad}


def test_ba_lora_terms_at_the_start():
    """Before training the adapted features are the base model's: consistency 0, the other two
    terms are their formulas on the features."""
    technique = BALoRA(r=2, lam_consistency=1.0, lam_diversity=1.0, lam_svd=1.0, k=2)
    module = mlp_module()
    technique.prepare(module)
    module.train()
    out = module.forward_step({"input": torch.randn(6, 4), "target": torch.randint(0, 3, (6,))})
    terms = technique.loss_terms(out, module)
    assert terms["consistency"].item() == pytest.approx(0.0, abs=1e-7)
    torch.testing.assert_close(terms["diversity"], diversity_loss(out.features))
    torch.testing.assert_close(terms["svd"], top_k_singular_loss(out.features, 2))
    assert technique.name == "ba_lora"
