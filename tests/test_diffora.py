"""DiffoRA (#28): the budgeted selection and the gate against hand computations, the search then
fine-tuning on the tiny ViT and on a BERT model, and checkpoints / merge that keep the selection."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch

from harness import quiet_trainer
from tiny_bert import tiny_bert
from reglab.callbacks.peft import DiffoRA
from reglab.callbacks.peft.diffora import ALPHA, MASK, gate, select_within_budget
from reglab.datamodules import DigitsDataModule
from reglab.tasks import ClassificationModule


def tiny_vit() -> ClassificationModule:
    torch.manual_seed(0)
    return ClassificationModule("vit", num_classes=10, input_shape=(1, 8, 8), backbone_kwargs={"depth": 2}, lr=1e-2)


def test_selection_fills_the_budget_by_score():
    # by score: 1 (cost 20, spent 20), 3 (40: 60 > 50, skipped), 0 (10, spent 30), 2 (30: 60 > 50, skipped)
    assert select_within_budget([0.5, 2.0, -1.0, 1.0], [10, 20, 30, 40], budget=50) == [0, 1]
    assert select_within_budget([0.5, 2.0, -1.0, 1.0], [10, 20, 30, 40], budget=100) == [0, 1, 2, 3]
    assert select_within_budget([0.0, 0.0], [5, 5], budget=5) == [0]  # ties: the earlier layer
    assert select_within_budget([0.0, 3.0], [50, 60], budget=10) == [1]  # none fits: the best one alone


def test_gate_scales_the_low_rank_update_by_hand():
    module = tiny_vit()
    DiffoRA(r=2, lora_alpha=4.0).prepare(module)
    layer = module.backbone.blocks[0].mlp.fc1
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
        getattr(layer, ALPHA).fill_(1.0)
    x = torch.randn(3, 64)
    base = layer.get_base_layer()(x)
    update = x @ layer.lora_A["default"].weight.T @ layer.lora_B["default"].weight.T
    sigmoid = 1 / (1 + math.exp(-1.0))
    torch.testing.assert_close(layer(x), base + sigmoid * (4.0 / 2) * update)
    getattr(layer, MASK).fill_(0.0)
    torch.testing.assert_close(layer(x), base)


class Snapshot(L.Callback):
    """The adapters and gates when the search ends (the first step after it)."""

    def __init__(self, at: int) -> None:
        self.at, self.state = at, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.at:
            self.state = {k: v.clone() for k, v in pl_module.state_dict().items() if "lora_" in k or ALPHA in k}


def test_search_then_only_the_kept_adapters_train(tmp_path):
    diffora, snapshot, module = DiffoRA(r=8, budget_rank=4, search_steps=4), Snapshot(at=4), tiny_vit()
    trainer = quiet_trainer(max_steps=10, enable_checkpointing=True, default_root_dir=tmp_path, callbacks=[diffora, snapshot])
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=64))
    layers = dict(module.named_modules())
    candidates = diffora.layer_names
    assert len(candidates) == 9  # patch embedding + (qkv, proj, fc1, fc2) x 2 blocks
    costs = {name: sum(p.numel() for n, p in layers[name].named_parameters() if "lora_" in n) for name in candidates}
    budget = sum(costs.values()) / 2
    kept_cost = sum(costs[name] for name in diffora.kept)
    assert 0 < len(diffora.kept) < len(candidates) and kept_cost <= budget
    # the gates searched: kept layers are those the greedy fill takes by alpha
    alphas = [float(getattr(layers[name], ALPHA).detach()) for name in candidates]
    assert len(set(alphas)) > 1
    assert [candidates[i] for i in select_within_budget(alphas, list(costs.values()), budget)] == diffora.kept
    after = module.state_dict()
    for key, before in snapshot.state.items():
        layer = key.split(".lora_")[0].removesuffix(f".{ALPHA}")
        frozen = ALPHA in key or layer not in diffora.kept
        assert torch.equal(after[key], before) == frozen, key
    assert all(float(getattr(layers[name], MASK)) == float(name in diffora.kept) for name in candidates)
    # what trains after the search: the kept adapters and the head
    head = sum(p.numel() for p in module.head.parameters())
    assert diffora.parameter_counts["trainable"] == kept_cost + head

    # a checkpoint keeps the selection; the merge folds the gates
    path = tmp_path / "diffora.ckpt"
    trainer.save_checkpoint(path)
    x = torch.rand(4, 1, 8, 8)
    module.eval()
    expected = module(x)
    reloaded = ClassificationModule.load_from_checkpoint(path).eval()
    torch.testing.assert_close(reloaded(x), expected)
    assert diffora.merge(reloaded) == len(candidates)
    assert not any(hasattr(m, ALPHA) for m in reloaded.modules())
    torch.testing.assert_close(reloaded(x), expected, atol=1e-5, rtol=1e-5)


def test_bert_query_key_value_dense(tmp_path):
    module, loader = tiny_bert(tmp_path, num_hidden_layers=2)
    diffora = DiffoRA(r=4, budget_rank=2, search_steps=2, target_modules=["query", "key", "value", "dense"])
    quiet_trainer(max_steps=4, callbacks=[diffora]).fit(module, loader)
    assert any(name.endswith("attention.self.query") for name in diffora.layer_names)
    assert 0 < len(diffora.kept) < len(diffora.layer_names)
    assert all(gate(module.get_submodule(n)) == 0 for n in diffora.layer_names if n not in diffora.kept)


def test_budget_rank_above_the_rank_is_refused():
    with pytest.raises(ValueError, match="budget_rank must be in"):
        DiffoRA(r=4, budget_rank=8)
