"""The finetune protocol's own pieces: the input perturbation, the scenario and grid settings."""

from __future__ import annotations

import pytest
import torch

from reglab.bench.protocols import ClaimError
from reglab.peft_claims import FinetuneProtocol, input_noise
from reglab.tasks import ClassificationModule


def test_input_noise_is_seeded_relative_to_the_inputs_and_removed_afterwards():
    module = ClassificationModule("mlp", num_classes=3, input_shape=(4,), backbone_kwargs={"hidden_sizes": (8,)}).eval()
    seen = []
    module.backbone.register_forward_pre_hook(lambda _, args: seen.append(args[0].clone()))
    inputs = 10 * torch.ones(5, 4)
    with input_noise(module, 0.5, seed=7):
        module(inputs)
    with input_noise(module, 0.5, seed=7):
        module(inputs)
    module(inputs)
    noisy, again, clean = seen
    torch.testing.assert_close(noisy, again)
    torch.testing.assert_close(clean, inputs)
    # std 0.5 of the inputs' root mean square (10): the noise's spread is about 5
    assert 3 < (noisy - inputs).std() < 7


def test_unknown_scenario_and_label_noise_on_text_are_refused():
    with pytest.raises(ClaimError, match="scenario must be one of"):
        FinetuneProtocol("c", {"scenario": "audio"}).check_arm("lora", {"lr": 1e-3, "technique": {}})
    with pytest.raises(ClaimError, match="target_noise is defined for the digits scenario only"):
        FinetuneProtocol("c", {"scenario": "text", "target_noise": 0.2}).check_arm("lora", {"lr": 1e-3, "technique": {}})


def test_an_arms_own_grid_takes_precedence_and_an_arm_needs_a_rate():
    protocol = FinetuneProtocol("c", {"lr_grid": [0.1, 0.2]})
    assert protocol.lr_grid({"lr_grid": [0.01]}) == [0.01]
    assert protocol.lr_grid({}) == [0.1, 0.2]
    with pytest.raises(ClaimError, match="give the arm an `lr`"):
        FinetuneProtocol("c", {}).check_arm("lora", {"technique": {}})
