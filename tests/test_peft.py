"""PEFT surgery: adapter math, layer selection, small checkpoints, reloading and merging."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn

from reglab.callbacks.peft import S2FT, BitFit, LoLDU, LoRA, LoRASB, SaRA, SVFit
from reglab.callbacks.peft.loldu import loldu_factors
from reglab.callbacks.peft.lora_sb import lora_sb_factors
from reglab.callbacks.peft.svfit import svfit_factors
from harness import ddp_strategy, noisy_digits, quiet_trainer, small_module
from reglab.nn.core_adapter import CoreAdapter
from reglab.peft_surgery import select_layers
from reglab.tasks import ClassificationModule
from reglab.technique import TechniqueConfigError


@pytest.mark.parametrize("factorize", [svfit_factors, loldu_factors])
def test_full_rank_factors_rebuild_the_weight(factorize):
    weight = torch.randn(6, 4)
    left, right, core = factorize(weight, None)
    torch.testing.assert_close(left @ torch.diag(core) @ right, weight, atol=1e-5, rtol=1e-5)


def test_lora_sb_factors_span_the_sign_step():
    gradient = torch.randn(6, 5)
    left, right, core = lora_sb_factors(gradient, rank=5)
    projected = left @ (left.T @ -torch.sign(gradient) @ right.T) @ right
    torch.testing.assert_close(projected, -torch.sign(gradient), atol=1e-5, rtol=1e-5)
    assert core.shape == (5, 5) and not core.any()


@pytest.mark.parametrize("layer", [nn.Linear(4, 6), nn.Conv2d(2, 3, 3, padding=1)])
def test_core_adapter_starts_as_the_layer_and_merges_exactly(layer):
    matrix = layer.weight.detach().reshape(layer.weight.shape[0], -1)
    x = torch.randn(2, 4) if isinstance(layer, nn.Linear) else torch.randn(2, 2, 5, 5)
    expected = layer(x)
    adapter = CoreAdapter(layer, *svfit_factors(matrix, 2), scale_init=0.5)
    torch.testing.assert_close(adapter(x), expected)
    with torch.no_grad():
        adapter.core += 1.0
        adapter.scale += 0.25
    changed = adapter(x)
    assert not torch.allclose(changed, expected)
    adapter.merge()
    torch.testing.assert_close(adapter.get_base_layer()(x), changed, atol=1e-5, rtol=1e-5)


def test_targets_default_to_every_layer_but_the_head_and_fail_loudly():
    vit = ClassificationModule("vit", num_classes=10, input_shape=(1, 8, 8), backbone_kwargs={"depth": 1})
    linears = select_layers(vit, None, (nn.Linear,))
    assert "head" not in linears and "backbone.blocks.0.attn.qkv" in linears
    assert select_layers(vit, ["qkv"], (nn.Linear,)) == ["backbone.blocks.0.attn.qkv"]
    with pytest.raises(ValueError, match="could match are"):
        select_layers(vit, ["no_such_layer"], (nn.Linear,))


@pytest.mark.parametrize("make", [lambda: LoRA(r=4), lambda: SVFit(rank=8), lambda: LoLDU(),
                                  lambda: LoRASB(rank=4, gradient_samples=64), lambda: BitFit(),
                                  lambda: SaRA(fraction=0.2, progressive_step=2), lambda: S2FT(d_ratio=0.2)],
                         ids=["LoRA", "SVFit", "LoLDU", "LoRASB", "BitFit", "SaRA", "S2FT"])
def test_small_checkpoint_loads_from_checkpoint_and_merges(make, tmp_path):
    pretrained = tmp_path / "pretrained.ckpt"
    torch.save({"state_dict": small_module(seed=3).state_dict()}, pretrained)
    technique, module = make(), small_module()
    technique.pretrained_checkpoint = str(pretrained)
    trainer = quiet_trainer(max_steps=4, enable_checkpointing=True, default_root_dir=tmp_path, callbacks=[technique])
    trainer.fit(module, datamodule=noisy_digits())
    path = tmp_path / "peft.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=True)["state_dict"]
    assert set(saved) == {n for n, p in module.named_parameters() if p.requires_grad} | {
        n for n, _ in module.state_dict().items() if n not in dict(module.named_parameters())}
    assert sum(v.numel() for v in saved.values()) < sum(p.numel() for p in module.parameters())

    x = torch.rand(5, 64)
    module.eval()
    expected = module(x)
    # a fresh module of the same seed would not give these outputs: the fine-tuned weights matter
    assert not torch.allclose(small_module(seed=3).eval()(x), expected)
    reloaded = ClassificationModule.load_from_checkpoint(path).eval()
    torch.testing.assert_close(reloaded(x), expected)
    # BitFit adds no adapter, so there is nothing to merge
    assert (technique.merge(reloaded) > 0) == (not isinstance(technique, BitFit))
    assert not any(isinstance(m, CoreAdapter) for m in reloaded.modules())
    torch.testing.assert_close(reloaded(x), expected, atol=1e-5, rtol=1e-5)


def test_load_from_checkpoint_names_a_missing_pretrained_checkpoint(tmp_path):
    pretrained = tmp_path / "pretrained.ckpt"
    torch.save({"state_dict": small_module(seed=3).state_dict()}, pretrained)
    trainer = quiet_trainer(max_steps=1, callbacks=[SVFit(pretrained_checkpoint=str(pretrained))])
    trainer.fit(small_module(), datamodule=noisy_digits())
    path = tmp_path / "peft.ckpt"
    trainer.save_checkpoint(path)
    pretrained.unlink()
    with pytest.raises(FileNotFoundError, match="pretrained.ckpt"):
        ClassificationModule.load_from_checkpoint(path)


def test_pretrained_checkpoint_is_the_starting_point(tmp_path):
    pretrained = small_module(seed=3)
    path = tmp_path / "pretrained.ckpt"
    torch.save({"state_dict": pretrained.state_dict()}, path)
    module = small_module(seed=0)
    SVFit(pretrained_checkpoint=str(path)).prepare(module)
    x = torch.rand(3, 64)
    torch.testing.assert_close(module(x), pretrained(x), atol=1e-5, rtol=1e-5)
    assert {n for n, p in module.named_parameters() if p.requires_grad} == {
        "backbone.layers.1.core", "head.weight", "head.bias"}


def test_lora_exports_with_peft_save_pretrained_and_peft_reloads_it(tmp_path):
    from peft import PeftModel

    pretrained = tmp_path / "pretrained.ckpt"
    torch.save({"state_dict": small_module(seed=3).state_dict()}, pretrained)
    lora, module = LoRA(r=4, pretrained_checkpoint=str(pretrained)), small_module()
    quiet_trainer(max_steps=4, callbacks=[lora]).fit(module, datamodule=noisy_digits())
    lora.save_pretrained(module, tmp_path / "adapter")
    assert {p.name for p in (tmp_path / "adapter").iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}

    x = torch.rand(5, 64)
    expected = module.eval()(x)
    base = small_module(seed=3).eval()  # the pretrained weights, as a user would have them
    assert not torch.allclose(base(x), expected)
    reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    torch.testing.assert_close(reloaded(x), expected)
    # the export copied the module: it still trains and still has its adapters
    assert any(".lora_A." in name for name, p in module.named_parameters() if p.requires_grad)


class SaveLoRASBFactors(L.Callback):
    """Writes every CoreAdapter's frozen factors to ``rank<r>.pt`` once training starts."""

    def __init__(self, directory):
        self.directory = directory

    def on_train_start(self, trainer, pl_module):
        factors = {f"{name}.{side}": getattr(layer, side).clone() for name, layer in pl_module.named_modules()
                   if isinstance(layer, CoreAdapter) for side in ("left", "right")}
        torch.save(factors, self.directory / f"rank{trainer.global_rank}.pt")


@pytest.mark.slow
def test_lora_sb_first_gradients_are_all_reduced_over_ddp_ranks(tmp_path):
    # 2 ranks x 64 samples in batches of 32 cover the same 128 samples (the seeded permutation,
    # rank r taking every second index) as one process taking the first 128
    factors = {}
    for devices, strategy in ((2, ddp_strategy()), (1, "auto")):
        directory = tmp_path / f"{devices}"
        directory.mkdir()
        trainer = quiet_trainer(max_steps=1, devices=devices, strategy=strategy,
                                callbacks=[LoRASB(rank=4, gradient_samples=128), SaveLoRASBFactors(directory)])
        trainer.fit(small_module(), datamodule=noisy_digits(batch_size=32))
        factors[devices] = [torch.load(path, weights_only=True) for path in sorted(directory.glob("rank*.pt"))]
    (rank0, rank1), (single,) = factors[2], factors[1]
    assert set(rank0) == set(single) and rank0
    for key in single:
        assert torch.equal(rank0[key], rank1[key]), f"{key} differs between the ranks"
        torch.testing.assert_close(rank0[key], single[key], atol=1e-5, rtol=1e-5)


def test_lora_export_of_a_module_without_lora_names_the_fix(tmp_path):
    with pytest.raises(TechniqueConfigError, match="no LoRA layer"):
        LoRA().save_pretrained(small_module(), tmp_path / "adapter")
