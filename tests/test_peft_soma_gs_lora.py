"""SoMA (#46) and GS-LoRA (#07): their math against hand computations on tiny tensors, and the
surgery on the built-in backbones."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from reglab.callbacks.peft import GSLoRA, SoMA
from reglab.callbacks.peft.gs_lora import adapter_group, bounded_forget_loss, group_lasso, retain_and_forget_losses
from reglab.callbacks.peft.soma import block_of, cosine_weight_decay, later_block_layers, minor_components
from harness import noisy_digits, quiet_trainer, small_module
from reglab.mixins import StepOutput
from reglab.tasks import ClassificationModule
from reglab.technique import TechniqueConfigError


def tiny(backbone: str) -> ClassificationModule:
    torch.manual_seed(0)
    kwargs = {"depth": 3} if backbone == "vit" else {}
    return ClassificationModule(backbone, num_classes=10, input_shape=(1, 8, 8), backbone_kwargs=kwargs)


# -- SoMA -----------------------------------------------------------------------------------------
def test_minor_components_of_a_diagonal_matrix_by_hand():
    # W = diag(3, 1) (+ a zero row): the minor singular triplet is (e2, 1, e2)
    weight = torch.tensor([[3.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    b, a, residual = minor_components(weight, rank=1)
    assert b.shape == (3, 1) and a.shape == (1, 2)
    torch.testing.assert_close(b @ a, torch.tensor([[0.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))
    torch.testing.assert_close(residual, torch.tensor([[3.0, 0.0], [0.0, 0.0], [0.0, 0.0]]))
    # B = U_r sqrt(s_r), A = sqrt(s_r) V_r^T: both carry sqrt(1) = 1 in norm
    assert math.isclose(b.norm().item(), 1.0, rel_tol=1e-6) and math.isclose(a.norm().item(), 1.0, rel_tol=1e-6)


def test_minor_split_reconstructs_and_keeps_the_principal_part():
    weight = torch.randn(6, 4)
    b, a, residual = minor_components(weight, rank=2)
    torch.testing.assert_close(residual + b @ a, weight)
    sigma = torch.linalg.svdvals(weight)
    torch.testing.assert_close(torch.linalg.svdvals(b @ a)[:2], sigma[2:])     # the two smallest
    torch.testing.assert_close(torch.linalg.svdvals(residual)[:2], sigma[:2])  # the two largest stay


def test_blocks_and_which_layers_soma_adapts():
    names = ["backbone.patch_embed.proj", "backbone.blocks.0.attn.qkv", "backbone.blocks.0.mlp.fc1",
             "backbone.blocks.1.mlp.fc1", "backbone.blocks.2.mlp.fc1"]
    assert block_of(names[0]) is None and block_of(names[2]) == "backbone.blocks.0"
    assert block_of("backbone.blocks.3") == "backbone.blocks.3"
    # 3 blocks, the first third frozen: blocks 1 and 2 adapt; the patch embedding never does
    assert later_block_layers(names, 1 / 3) == names[3:]
    assert later_block_layers(names, 0.0) == names[1:]
    assert later_block_layers(names, 0.5) == names[4:]  # 1.5 blocks rounds half up to 2


def test_cosine_weight_decay_schedule_by_hand():
    assert cosine_weight_decay(0, 100, 0.05, 1e-5) == pytest.approx(0.05)
    assert cosine_weight_decay(50, 100, 0.05, 1e-5) == pytest.approx((0.05 + 1e-5) / 2)
    assert cosine_weight_decay(100, 100, 0.05, 1e-5) == pytest.approx(1e-5)
    assert cosine_weight_decay(25, 100, 0.05, 0.0) == pytest.approx(0.05 * (1 + math.cos(math.pi / 4)) / 2)


@pytest.mark.parametrize("backbone", ["vit", "cnn"])
def test_soma_starts_from_the_pretrained_function_and_freezes_early_blocks(backbone):
    module, x = tiny(backbone), torch.rand(5, 1, 8, 8)
    module.eval()
    before, weights = module(x), {k: v.clone() for k, v in module.state_dict().items()}
    soma = SoMA(r=4)
    soma.prepare(module)
    torch.testing.assert_close(module(x), before, atol=1e-5, rtol=1e-5)
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable and all("blocks.0." not in n and "patch_embed" not in n for n in trainable)
    assert any("lora_A" in n for n in trainable)
    assert all(n in trainable for n, _ in module.named_parameters() if n.endswith("base_layer.bias"))
    assert all("lora_" in n or n.endswith("bias") or n.startswith("head.") for n in trainable)
    # the first block (a third of 3 blocks) is not adapted at all
    assert not any("blocks.0" in name for name in soma.adapted_layers)
    assert soma.merge(module) == len(soma.adapted_layers)
    for key, value in module.state_dict().items():
        torch.testing.assert_close(value, weights[key], atol=1e-5, rtol=1e-5, msg=key)


def test_soma_rank_wider_than_a_layer_fails_at_setup():
    with pytest.raises(TechniqueConfigError, match="SoMA: r=64 exceeds"):
        SoMA(r=64).prepare(small_module())  # the MLP's hidden layer is 32 x 64


def test_soma_small_checkpoint_reloads_and_merges(tmp_path):
    """The frozen residual W - B0 A0 is not saved: reloading redoes the split from the pretrained weights."""
    pretrained = tmp_path / "pretrained.ckpt"
    torch.save({"state_dict": small_module(seed=3).state_dict()}, pretrained)
    soma, module = SoMA(r=4, pretrained_checkpoint=str(pretrained)), small_module()
    trainer = quiet_trainer(max_steps=4, default_root_dir=tmp_path, callbacks=[soma])
    trainer.fit(module, datamodule=noisy_digits())
    path = tmp_path / "soma.ckpt"
    trainer.save_checkpoint(path)
    assert "backbone.layers.1.base_layer.weight" not in torch.load(path, weights_only=True)["state_dict"]
    x = torch.rand(5, 64)
    expected = module.eval()(x)
    reloaded = ClassificationModule.load_from_checkpoint(path).eval()
    torch.testing.assert_close(reloaded(x), expected)
    assert soma.merge(reloaded) == 1
    torch.testing.assert_close(reloaded(x), expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(TechniqueConfigError, match="merge"):
        soma.save_pretrained(module, tmp_path / "adapter")


def test_soma_decoupled_weight_decay_step():
    parameter = torch.nn.Parameter(torch.full((3,), 2.0))
    frozen = torch.nn.Parameter(torch.full((3,), 2.0), requires_grad=False)
    parameter.grad = torch.zeros(3)
    optimizer = torch.optim.SGD([parameter, frozen], lr=0.1)
    soma = SoMA(weight_decay=0.05, final_weight_decay=0.0)
    trainer = SimpleNamespace(global_step=50, estimated_stepping_batches=100)
    soma.on_before_optimizer_step(trainer, torch.nn.Module(), optimizer)
    torch.testing.assert_close(parameter.data, torch.full((3,), 2.0 * (1 - 0.1 * 0.025)))
    torch.testing.assert_close(frozen.data, torch.full((3,), 2.0))


def test_soma_refuses_an_optimizer_with_its_own_weight_decay():
    module = ClassificationModule("mlp", num_classes=10, input_shape=(64,), backbone_kwargs={"hidden_sizes": (32,)},
                                  weight_decay=0.01)
    with pytest.raises(TechniqueConfigError, match="weight_decay to 0"):
        quiet_trainer(max_steps=1, callbacks=[SoMA(r=4)]).fit(module, datamodule=noisy_digits())


# -- GS-LoRA --------------------------------------------------------------------------------------
def test_group_lasso_by_hand():
    groups = [[torch.tensor([3.0, 4.0])], [torch.tensor([1.0]), torch.tensor([[2.0, 2.0]])]]
    assert group_lasso(groups).item() == pytest.approx(5.0 + 3.0)
    switched_off = torch.zeros(2, requires_grad=True)  # a group the lasso zeroed keeps a finite gradient
    group_lasso([[switched_off]]).backward()
    torch.testing.assert_close(switched_off.grad, torch.zeros(2))


def test_bounded_forget_loss_by_hand():
    ce = torch.tensor([4.0, 12.0], requires_grad=True)
    loss = bounded_forget_loss(ce, bound=10.0)
    torch.testing.assert_close(loss, torch.tensor([6.0, 0.0]))
    loss.sum().backward()
    torch.testing.assert_close(ce.grad, torch.tensor([-1.0, 0.0]))  # ascent below the bound, none above


def test_retain_and_forget_split_by_hand():
    per_sample = torch.tensor([1.0, 2.0, 3.0, 4.0])
    retain, forget = retain_and_forget_losses(per_sample, torch.tensor([False, True, False, True]))
    torch.testing.assert_close(retain, torch.tensor([2.0, 0.0, 6.0, 0.0]))
    assert retain.mean().item() == pytest.approx((1.0 + 3.0) / 2) and forget.item() == pytest.approx(3.0)
    _, none = retain_and_forget_losses(per_sample, torch.zeros(4, dtype=torch.bool))
    assert none is None


def test_adapter_groups():
    assert adapter_group("backbone.blocks.0.mlp.fc1") == "backbone.blocks.0.mlp"
    assert adapter_group("backbone.blocks.3") == "backbone.blocks.3"  # a conv directly in nn.Sequential
    assert adapter_group("fc") == "fc"


def test_gs_lora_groups_ffn_adapters_per_block_and_losses_match_hand_computation():
    module = tiny("vit")
    technique = GSLoRA(forget_classes=[0, 1], target_modules=["mlp"], forget_bound=10.0)
    technique.prepare(module)
    assert sorted(technique.groups) == [f"backbone.blocks.{i}.mlp" for i in range(3)]
    assert all(len(params) == 4 for params in technique.groups.values())  # A, B of fc1 and fc2
    expected_lasso = sum(torch.sqrt(sum(p.pow(2).sum() for p in group)) for group in technique.groups.values())

    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 3.0], [1.0, 1.0, 1.0]])
    labels = torch.tensor([0, 1, 2, 2])
    out = StepOutput(logits=logits, target=labels)
    ce = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    retain = technique.task_loss(out, module)
    assert retain.mean().item() == pytest.approx(ce[2:].mean().item())
    terms = technique.loss_terms(out, module)
    assert terms["forget"].item() == pytest.approx(0.15 * (10.0 - ce[:2].mean().item()))
    assert terms["group_sparsity"].item() == pytest.approx(1e-4 * expected_lasso.item(), rel=1e-5)


def test_gs_lora_rejects_classes_the_data_does_not_have():
    trainer = SimpleNamespace(datamodule=SimpleNamespace(num_classes=10))
    with pytest.raises(TechniqueConfigError, match=r"forget_classes \[3, 12\]"):
        GSLoRA(forget_classes=[3, 12]).prepare(small_module(), trainer)
    with pytest.raises(ValueError, match="forget_classes is empty"):
        GSLoRA(forget_classes=[])
