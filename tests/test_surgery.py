"""Surgery trains what it says (issue 10, item 5): on Lightning's own BoringModel and demo
Transformer, every adapter goes where the forward pass uses it, BitFit trains every bias, a
parameter that trains without a gradient is named, and a selector that matches nothing fails at
setup naming what it tried and what it saw."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.demos import Transformer
from lightning.pytorch.demos.boring_classes import BoringModel
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from reglab.callbacks.peft import BitFit, LinearProbe, LoRA, SVFit
from reglab.technique import TechniqueConfigError

VOCAB = 11


class DemoTransformer(L.LightningModule):
    """Lightning's demo Transformer with its own loss (what `LightningTransformer` does, without
    the WikiText2 download); the model has no `head`."""

    def __init__(self) -> None:
        super().__init__()
        self.model = Transformer(vocab_size=VOCAB, ninp=8, nhead=2, nhid=8, nlayers=2, dropout=0.0)

    def forward(self, inputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.model(inputs, target)

    def training_step(self, batch, batch_idx):
        inputs, target = batch
        return F.nll_loss(self(inputs, target), target.reshape(-1))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)

    def train_dataloader(self):
        tokens = torch.randint(0, VOCAB, (8, 5), generator=torch.Generator().manual_seed(0))
        return DataLoader(TensorDataset(tokens, tokens.roll(1, dims=1)), batch_size=4)


class BoringWithUnusedBranch(BoringModel):
    """BoringModel with a layer its forward pass never calls."""

    def __init__(self) -> None:
        super().__init__()
        self.unused = nn.Linear(32, 2)


def fit(module: L.LightningModule, technique, steps: int = 2) -> None:
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[technique])
    trainer.fit(module)


def trainable(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("technique", [LoRA(r=2), SVFit()], ids=["LoRA", "SVFit"])
def test_every_adapter_on_the_demo_transformer_trains(technique, recwarn):
    torch.manual_seed(0)
    module = DemoTransformer()
    technique.prepare(module)
    before = trainable(module)
    fit(module, technique)
    after = trainable(module)
    # two SGD steps move every parameter that takes part in the loss (LoRA's A only from step 2 on)
    unchanged = [name for name in before if torch.equal(before[name], after[name])]
    assert not unchanged, f"trainable but never updated: {unchanged}"
    assert not [w for w in recwarn if "received no gradient" in str(w.message)]
    if isinstance(technique, LoRA):
        # peft's attention layer adapts the input projection the attention does use
        assert any(".self_attn.lora_A." in name for name in after)
        assert any(".multihead_attn.lora_A." in name for name in after)


def test_lora_on_attention_merges_into_the_same_function():
    torch.manual_seed(0)
    module, lora = DemoTransformer(), LoRA(r=2)
    fit(module, lora)
    inputs, target = next(iter(module.train_dataloader()))
    module.eval()
    with torch.no_grad():
        adapted = module(inputs, target)
        assert lora.merge(module) == 15  # 6 attentions (in and out projections each) + 9 linear layers
        merged = module(inputs, target)
    assert not any(isinstance(m, nn.Module) and hasattr(m, "lora_A") for m in module.modules())
    torch.testing.assert_close(merged, adapted, rtol=1e-5, atol=1e-5)


def test_bitfit_trains_the_attention_input_bias():
    torch.manual_seed(0)
    module, bitfit = DemoTransformer(), BitFit()
    bitfit.prepare(module)
    names = set(trainable(module))
    assert "model.transformer.encoder.layers.0.self_attn.in_proj_bias" in names
    assert "model.transformer.encoder.layers.0.self_attn.in_proj_weight" not in names
    assert all(name.endswith("bias") for name in names)
    before = trainable(module)
    fit(module, bitfit)
    after = trainable(module)
    assert not [name for name in before if torch.equal(before[name], after[name])]


@pytest.mark.parametrize(("make", "children"), [(DemoTransformer, "'model', 'model.pos_encoder'"), (BoringModel, "'layer'")],
                         ids=["demo-transformer", "boring-model"])
def test_linear_probe_without_a_head_fails_at_setup(make, children):
    with pytest.raises(TechniqueConfigError, match=rf"LinearProbe: .*\['classifier', 'head', 'score'\].*{children}"):
        fit(make(), LinearProbe())


def test_a_target_pattern_that_matches_nothing_fails_at_setup_naming_it():
    module = BoringModel()
    with pytest.raises(TechniqueConfigError, match=r"LoRA: the target_modules patterns \['lyer'\] match no .*\['layer'\]"):
        fit(module, LoRA(r=2, target_modules=["layer", "lyer"]))
    assert not any("lora_" in name for name, _ in module.named_parameters())


def test_an_attention_output_projection_is_not_a_target_for_weight_adapters():
    with pytest.raises(TechniqueConfigError, match=r"SVFit: .*\['out_proj'\].*nn.MultiheadAttention reads by weight"):
        SVFit(target_modules=["out_proj"]).prepare(DemoTransformer())


def test_a_trainable_parameter_without_gradient_is_named_after_the_first_step():
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match=r"received no gradient in the first step.*unused\.lora_A\.default\.weight"):
        fit(BoringWithUnusedBranch(), LoRA(r=2, target_modules=["layer", "unused"]), steps=1)


class Encoder(nn.Module):
    """A batch-first nn.TransformerEncoder, whose layers have PyTorch's fused inference path."""

    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(8, nhead=2, dim_feedforward=16, dropout=0.0, batch_first=True)
        self.encoder, self.head = nn.TransformerEncoder(layer, num_layers=2), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x, src_key_padding_mask=padding).mean(1))


def test_adapters_inside_transformer_encoder_layers_take_part_in_evaluation():
    torch.manual_seed(0)
    model = Encoder()
    LoRA(r=2).prepare(model)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_()  # adapters that change the function
    x, padding = torch.randn(2, 5, 8), torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    trained = model.train()(x, padding)
    with torch.no_grad():
        evaluated = model.eval()(x, padding)
    torch.testing.assert_close(evaluated, trained.detach(), rtol=1e-5, atol=1e-5)


def test_lora_on_attention_exports_with_peft_and_peft_reloads_it(tmp_path):
    from peft import PeftModel

    torch.manual_seed(0)
    module, lora = DemoTransformer(), LoRA(r=2)
    pretrained = {name: value.clone() for name, value in module.model.state_dict().items()}
    fit(module, lora)
    lora.save_pretrained(module, tmp_path / "adapter", root="model")
    inputs, target = next(iter(module.train_dataloader()))
    base = Transformer(vocab_size=VOCAB, ninp=8, nhead=2, nhid=8, nlayers=2, dropout=0.0)
    base.load_state_dict(pretrained)
    # in train mode (no dropout here): in eval, peft's model itself takes PyTorch's fused encoder
    # path, which skips its adapters (the surgery above keeps that path off)
    reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter").train()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(inputs, target), module.eval()(inputs, target), rtol=1e-5, atol=1e-5)
