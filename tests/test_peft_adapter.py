"""PeftAdapter: any peft method through reglab's surgery (setup, trimmed checkpoints, merge)."""

from __future__ import annotations

import pytest
import torch

from harness import noisy_digits, quiet_trainer, small_module
from reglab.callbacks.peft import PeftAdapter
from reglab.tasks import ClassificationModule
from reglab.technique import TechniqueConfigError

METHODS = {
    "dora": ("lora", {"r": 4, "use_dora": True}),
    "pissa": ("lora", {"r": 4, "init_lora_weights": "pissa"}),
    "olora": ("lora", {"r": 4, "init_lora_weights": "olora"}),
    "vera": ("vera", {"r": 8}),
    "fourierft": ("fourierft", {"n_frequency": 16}),
    "ia3": ("ia3", {"feedforward_modules": []}),
    "loha": ("loha", {"r": 4}),
    "lokr": ("lokr", {"r": 4}),
    "oft": ("oft", {"r": 0, "oft_block_size": 8}),
    "boft": ("boft", {"boft_block_size": 4}),
}


@pytest.mark.parametrize("case", sorted(METHODS))
def test_every_method_trains_only_its_layers_and_reloads_from_a_trimmed_checkpoint(case, tmp_path):
    method, config = METHODS[case]
    pretrained = tmp_path / "pretrained.ckpt"
    torch.save({"state_dict": small_module(seed=3).state_dict()}, pretrained)
    technique, module = PeftAdapter(method, config, pretrained_checkpoint=str(pretrained)), small_module()
    trainer = quiet_trainer(max_steps=3, callbacks=[technique])

    trainer.fit(module, datamodule=noisy_digits())
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("head.") or "default" in n for n in trainable), trainable
    assert any(not n.startswith("head.") for n in trainable)
    assert 0 < technique.parameter_counts["trainable"] < technique.parameter_counts["total"]

    path = tmp_path / "adapter.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=True)["state_dict"]
    assert trainable <= set(saved) and not any(n in saved for n, p in module.named_parameters() if not p.requires_grad)
    x = torch.rand(4, 64)
    module.eval()
    expected = module(x)
    reloaded = ClassificationModule.load_from_checkpoint(path).eval()
    torch.testing.assert_close(reloaded(x), expected)
    assert technique.merge(reloaded) > 0
    torch.testing.assert_close(reloaded(x), expected, atol=1e-4, rtol=1e-4)


def test_pissa_rewrites_the_frozen_weight_and_keeps_it_frozen():
    module, reference = small_module(), small_module()
    PeftAdapter("lora", {"r": 4, "init_lora_weights": "pissa"}).prepare(module)
    x = torch.rand(3, 64)
    torch.testing.assert_close(module(x), reference(x), atol=1e-4, rtol=1e-4)  # residual + principal part
    base = module.backbone.layers[1].base_layer.weight
    assert not base.requires_grad and not torch.allclose(base, reference.backbone.layers[1].weight)


@pytest.mark.parametrize("kwargs, message", [
    ({"method": "lorra"}, r"peft has no method 'lorra' \(close: \['LORA'"),
    ({"method": "prompt_tuning"}, "prompt-learning method"),
    ({"method": "adalora"}, "ADALORA needs more than an injection. Fix: use reglab.callbacks.AdaLoRA"),
    ({"config": {"rr": 4}}, r"LoraConfig has no field\(s\) \['rr'\] \(close: \{'rr': \['r'\]\}\)"),
    ({"config": {"target_modules": ["x"]}}, "pass target_modules to PeftAdapter itself"),
])
def test_bad_methods_and_configs_are_refused_when_built(kwargs, message):
    with pytest.raises(TechniqueConfigError, match=message):
        PeftAdapter(**kwargs)


def test_a_layer_the_method_cannot_adapt_fails_at_setup_naming_the_fix():
    cnn = ClassificationModule("cnn", num_classes=10, input_shape=(1, 8, 8))
    with pytest.raises(TechniqueConfigError, match="VERA cannot adapt the chosen layers.*Fix: set target_modules"):
        PeftAdapter("vera", {"r": 8}).prepare(cnn)


def test_adalora_orthogonality_is_the_frobenius_distance_from_orthonormal_factors():
    from reglab.callbacks.peft.adalora import adalora_orthogonality

    layer = torch.nn.Module()
    layer.lora_A = torch.nn.ParameterDict({"default": torch.nn.Parameter(torch.eye(2, 3))})        # rows orthonormal
    layer.lora_B = torch.nn.ParameterDict({"default": torch.nn.Parameter(2.0 * torch.eye(3, 2))})  # BᵀB = 4 I
    # (‖0‖ + ‖4I − I‖_F) / 2 = (0 + 3·√2) / 2
    torch.testing.assert_close(adalora_orthogonality(layer), torch.tensor(3.0 * 2**0.5 / 2))


def test_adalora_prunes_to_its_target_budget_by_the_end_of_the_schedule():
    from reglab.callbacks.peft import AdaLoRA

    technique = AdaLoRA({"init_r": 6, "target_r": 2, "tinit": 2, "tfinal": 2, "total_step": 10})
    module = small_module()
    quiet_trainer(max_steps=10, callbacks=[technique]).fit(module, datamodule=noisy_digits())
    singular_values = [p for n, p in module.named_parameters() if "lora_E" in n]
    assert singular_values and technique.allocated_at == 10
    kept = sum(int((e != 0).sum()) for e in singular_values)
    assert kept <= 2 * len(singular_values) < 6 * len(singular_values)
    state = technique.state_dict()
    assert any(k.startswith("rank_pattern/") for k in state)
    assert not any(k.startswith("exp_avg_ipt/") for k in state)  # reset at the final allocation


def test_adalora_scores_the_first_step_before_allocating_so_a_one_step_schedule_runs():
    # a regression: steps numbered from 1 made a one-step run's only call the final allocation,
    # which reads importance scores no step had recorded (KeyError in peft's RankAllocator)
    from reglab.callbacks.peft import AdaLoRA

    technique = AdaLoRA({"init_r": 4, "target_r": 2, "tinit": 0, "tfinal": 0})
    quiet_trainer(max_steps=1, callbacks=[technique]).fit(small_module(), datamodule=noisy_digits())
    assert technique.config["total_step"] == 1 and technique.allocated_at == 1
    assert any(key.startswith("exp_avg_ipt/") for key in technique.state_dict())


def test_adalora_takes_the_run_length_at_setup_and_refuses_a_run_too_short_for_its_schedule():
    from reglab.callbacks.peft import AdaLoRA

    technique = AdaLoRA({"init_r": 4, "target_r": 2, "tinit": 3, "tfinal": 3})  # total_step comes at setup
    module = small_module()
    quiet_trainer(max_steps=8, callbacks=[technique]).fit(module, datamodule=noisy_digits())
    assert technique.config["total_step"] == 8 and technique.allocated_at == 8
    with pytest.raises(TechniqueConfigError, match="AdaLoraConfig refuses the config.*budgeting phase"):
        quiet_trainer(max_steps=5, callbacks=[AdaLoRA({"tinit": 3, "tfinal": 3})]).fit(small_module(), datamodule=noisy_digits())
