"""S²FT's maths on hand-made layers and its structure selection on the tiny ViT and a tiny BERT."""

import pytest
import torch
from torch import nn

from reglab.callbacks.peft.s2ft import S2FT, StructuredSparseLinear, structure_units
from reglab.tasks import ClassificationModule
from reglab.technique import TechniqueConfigError
from tiny_bert import TinyBertClassifier


@pytest.mark.parametrize("axis", ["rows", "cols"])
def test_sub_matrix_update_equals_the_dense_update(axis):
    torch.manual_seed(0)
    base = nn.Linear(4, 3)
    index = torch.tensor([0, 2]) if axis == "rows" else torch.tensor([1, 3])
    layer = StructuredSparseLinear(base, index, axis)
    assert layer.s2.shape == ((2, 4) if axis == "rows" else (3, 2))
    with torch.no_grad():
        layer.s2.copy_(torch.arange(layer.s2.numel(), dtype=torch.float32).view_as(layer.s2))
    dense = base.weight.detach().clone()
    if axis == "rows":
        dense[index] += layer.s2.detach()
    else:
        dense[:, index] += layer.s2.detach()
    x = torch.randn(5, 7, 4)  # (batch, tokens, features)
    torch.testing.assert_close(layer(x), x @ dense.T + base.bias.detach())
    layer.merge()
    torch.testing.assert_close(base.weight.detach(), dense)
    torch.testing.assert_close(layer(x), x @ dense.T + base.bias.detach())


def test_starts_as_the_pretrained_layer_and_only_the_sub_matrix_gets_a_gradient():
    base = nn.Linear(4, 3)
    base.weight.requires_grad_(False)
    base.bias.requires_grad_(False)
    layer = StructuredSparseLinear(base, torch.tensor([1, 3]), "cols")
    x = torch.randn(2, 4)
    torch.testing.assert_close(layer(x), base(x))
    layer(x).pow(2).sum().backward()
    # d/dS sum(y^2) = 2 y^T x[:, cols]
    torch.testing.assert_close(layer.s2.grad, 2 * base(x).T @ x[:, [1, 3]])
    assert base.weight.grad is None


def vit():
    return ClassificationModule("vit", num_classes=10, input_shape=(1, 8, 8), backbone_kwargs={"depth": 2})


def test_vit_units_are_heads_of_the_fused_qkv_and_proj_and_the_mlp_channels():
    module = vit()  # embed 64, 4 heads of 16, mlp 128
    names = [n for n, m in module.named_modules() if isinstance(m, nn.Linear) and not n.startswith("head")]
    units = structure_units(module, names)
    assert len(units["v_ratio"]) == len(units["o_ratio"]) == 8 and len(units["d_ratio"]) == 256
    first_value = units["v_ratio"][0]
    assert first_value.layer == "backbone.blocks.0.attn.qkv" and first_value.indices == range(128, 144)
    assert units["o_ratio"][1].layer == "backbone.blocks.0.attn.proj" and units["o_ratio"][1].indices == range(16, 32)
    assert units["u_ratio"][0].layer == "backbone.blocks.0.mlp.fc1"


def test_selection_counts_are_int_ratio_times_units_and_follow_the_seed():
    module = vit()
    s2ft = S2FT(o_ratio=0.25, d_ratio=0.25)
    s2ft.prepare(module)
    columns = {name: len(idx) for name, idx in s2ft.selection.items()}
    assert sum(v for n, v in columns.items() if n.endswith("attn.proj")) == 2 * 16  # int(0.25 * 8) heads
    assert sum(v for n, v in columns.items() if n.endswith("mlp.fc2")) == 64  # int(0.25 * 256) channels
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert all(n.endswith(".s2") or n.startswith("head.") for n in trainable)
    assert s2ft.parameter_counts["trainable"] == 2 * 64 * 16 + 64 * 64 + 64 * 10 + 10
    again = S2FT(o_ratio=0.25, d_ratio=0.25)
    again.prepare(vit())
    other = S2FT(o_ratio=0.25, d_ratio=0.25, seed=1)
    other.prepare(vit())
    assert again.selection == s2ft.selection != other.selection


def test_bert_layers_get_their_roles_and_query_key_stay_frozen():
    model = TinyBertClassifier(layers=2)
    S2FT(v_ratio=1.0, o_ratio=1.0, u_ratio=1.0, d_ratio=1.0).prepare(model)
    layer = model.backbone.encoder.layer[0]
    assert layer.attention.self.value.axis == "rows" and layer.intermediate.dense.axis == "rows"
    assert layer.attention.output.dense.axis == "cols" and layer.output.dense.axis == "cols"
    assert type(layer.attention.self.query) is nn.Linear and type(model.backbone.pooler.dense) is nn.Linear
    model(torch.randint(0, 50, (2, 5))).sum().backward()
    assert layer.output.dense.s2.grad is not None


def test_ratios_that_select_no_unit_fail_at_setup():
    with pytest.raises(TechniqueConfigError, match="the ratios select no unit"):
        S2FT(o_ratio=0.1, d_ratio=0.0).prepare(vit())  # int(0.1 * 8 heads) = 0


def test_all_ratios_zero_is_refused():
    with pytest.raises(ValueError, match="every ratio is 0"):
        S2FT(d_ratio=0.0)
