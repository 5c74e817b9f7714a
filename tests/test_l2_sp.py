"""L2-SP: the penalty and its gradient by hand, the starting point (fit start or a pretrained
checkpoint) and the set-up errors."""

from __future__ import annotations

import pytest
import torch

from reglab import registry
from reglab.callbacks.baselines.l2_sp import L2SP
from reglab.mixins import StepOutput
from reglab.tasks import ClassificationModule
from reglab.technique import TechniqueConfigError


def _module(seed: int = 0, num_classes: int = 10) -> ClassificationModule:
    torch.manual_seed(seed)
    return ClassificationModule("mlp", num_classes=num_classes, input_shape=(4,), backbone_kwargs={"hidden_sizes": (3,)})


def _out(module) -> StepOutput:
    return StepOutput(logits=torch.zeros(2, module.num_classes), target=torch.zeros(2, dtype=torch.long))


def test_penalty_and_gradient_are_the_papers_formula_by_hand():
    module, technique = _module(), L2SP(alpha=0.3, beta=0.05)
    technique.on_fit_start(None, module)
    shared = {n: p for n, p in module.named_parameters() if not n.startswith("head.")}
    assert set(technique.anchor) == set(shared) and shared
    with torch.no_grad():
        for p in shared.values():
            p.add_(0.5)  # every shared weight 0.5 away from its starting point
    terms = technique.loss_terms(_out(module), module)
    shared_count = sum(p.numel() for p in shared.values())
    torch.testing.assert_close(terms["starting_point"], torch.tensor(0.3 / 2 * 0.25 * shared_count))
    head_square = module.head.weight.pow(2).sum() + module.head.bias.pow(2).sum()
    torch.testing.assert_close(terms["new_weights"], 0.05 / 2 * head_square.detach())
    (terms["starting_point"] + terms["new_weights"]).backward()
    for p in shared.values():
        torch.testing.assert_close(p.grad, torch.full_like(p, 0.3 * 0.5))  # alpha (w - w0)
    torch.testing.assert_close(module.head.weight.grad, 0.05 * module.head.weight.detach())  # beta w


def _fit(technique, module, steps=3):
    registry.example_trainer(max_steps=steps, callbacks=[technique]).fit(module, datamodule=registry.example_data())


def test_starts_from_and_pulls_towards_the_pretrained_checkpoint_with_a_new_head(tmp_path):
    pretrained = ClassificationModule("mlp", num_classes=5, input_shape=(64,), backbone_kwargs={"hidden_sizes": (32,)})
    path = tmp_path / "pretrained.ckpt"
    torch.save({"state_dict": pretrained.state_dict()}, path)
    module = registry.example_module(seed=3)  # the same backbone, a 10-class head
    head_before = module.head.weight.detach().clone()
    technique = L2SP(pretrained_checkpoint=str(path))
    _fit(technique, module, steps=1)
    for name, value in pretrained.backbone.state_dict().items():
        torch.testing.assert_close(technique.anchor[f"backbone.{name}"], value)  # anchored to the checkpoint
    assert not any(name.startswith("head.") for name in technique.anchor)
    assert module.head.weight.shape == head_before.shape  # the new head kept its own shape
    assert technique.parameter_counts["trainable"] == technique.parameter_counts["total"]


def test_without_a_checkpoint_the_anchor_is_the_weights_at_fit_start_and_is_kept_for_a_later_fit():
    module = registry.example_module(seed=4)
    start = {n: p.detach().clone() for n, p in module.named_parameters() if not n.startswith("head.")}
    technique = L2SP()
    _fit(technique, module)
    for name, value in start.items():
        torch.testing.assert_close(technique.anchor[name], value)
    moved = {n: p.detach().clone() for n, p in module.named_parameters()}
    assert any(not torch.equal(moved[n], start[n]) for n in start)
    _fit(technique, module)  # the same model again: still the first starting point
    for name, value in start.items():
        torch.testing.assert_close(technique.anchor[name], value)


def test_a_checkpoint_without_the_shared_weights_is_refused_at_setup(tmp_path):
    other = ClassificationModule("mlp", num_classes=10, input_shape=(64,), backbone_kwargs={"hidden_sizes": (16,)})
    path = tmp_path / "other.ckpt"
    torch.save({"state_dict": other.state_dict()}, path)
    with pytest.raises(TechniqueConfigError, match="L2SP: the pretrained checkpoint .* backbone.layers.1.weight"):
        _fit(L2SP(pretrained_checkpoint=str(path)), registry.example_module())


def test_new_modules_that_name_nothing_are_refused_at_setup():
    with pytest.raises(TechniqueConfigError, match="new_modules=\\['classifier'\\].*Fix: name the new layers"):
        _fit(L2SP(new_modules=["classifier"]), registry.example_module())


def test_bad_weights_are_refused():
    with pytest.raises(ValueError, match="L2SP: alpha and beta must be >= 0"):
        L2SP(alpha=-1.0)
