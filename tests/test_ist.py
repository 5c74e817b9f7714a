"""IST (#68): the score update against a hand computation, which adapters train each step, the
units of the built-in ViT and of a BERT model, and identical scores on two DDP ranks."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch

from harness import ddp_strategy, quiet_trainer
from tiny_bert import tiny_bert
from reglab.callbacks.peft import IST
from reglab.callbacks.peft.ist import layer_unit, score_update
from reglab.datamodules import DigitsDataModule
from reglab.tasks import ClassificationModule
from reglab.technique import TechniqueConfigError


def tiny_vit() -> ClassificationModule:
    torch.manual_seed(0)
    return ClassificationModule("vit", num_classes=10, input_shape=(1, 8, 8), backbone_kwargs={"depth": 3})


def test_units_are_blocks_and_the_layers_outside_them():
    assert layer_unit("backbone.blocks.0.attn.qkv") == layer_unit("backbone.blocks.0.mlp.fc2") == "backbone.blocks.0"
    assert layer_unit("backbone.patch_embed.proj") == "backbone.patch_embed.proj"
    assert layer_unit("backbone.blocks.6") == "backbone.blocks.6"  # the CNN's convolutions in one Sequential
    assert layer_unit("backbone.model.bert.encoder.layer.2.attention.self.query") == "backbone.model.bert.encoder.layer.2"


def test_score_update_by_hand():
    # sets {0,1}, {1,2}, {0,2} with losses 1, 2, 3; p = 0.5 so p(1-p) = 0.25, rl_lr 10
    r = [math.exp(-1), math.exp(-2), math.exp(-3)]
    mean = sum(r) / 3
    c = [x - mean for x in r]  # 0.18354, -0.04900, -0.13455
    expected = [2.5 * (c[0] + c[2]), 2.5 * (c[0] + c[1]), 2.5 * (c[1] + c[2])]
    sets = [torch.tensor([0, 1]), torch.tensor([1, 2]), torch.tensor([0, 2])]
    scores = score_update(torch.zeros(3), sets, torch.tensor([1.0, 2.0, 3.0]), rl_lr=10.0)
    torch.testing.assert_close(scores, torch.tensor(expected))
    assert scores[1] > scores[0] > scores[2]  # unit 2 was in the costly sets: the most important one
    # a unit in no suppressed set keeps its score; p(1-p) shrinks the step where the score is large
    moved = score_update(torch.tensor([0.0, 4.0, 1.0]), [torch.tensor([1]), torch.tensor([2])], torch.tensor([1.0, 2.0]), 10.0)
    half = (math.exp(-1) - math.exp(-2)) / 2
    p1, p2 = torch.sigmoid(torch.tensor(4.0)).item(), torch.sigmoid(torch.tensor(1.0)).item()
    torch.testing.assert_close(moved, torch.tensor([0.0, 4.0 + 10 * half * p1 * (1 - p1), 1.0 - 10 * half * p2 * (1 - p2)]))


class RecordGradients(L.Callback):
    """After each backward pass: which units' adapters hold a gradient, and which are active."""

    def __init__(self, ist: IST) -> None:
        self.ist, self.steps = ist, []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        with_gradient = {i for i, params in enumerate(self.ist.unit_parameters) if any(p.grad is not None for p in params)}
        self.steps.append((with_gradient, set(self.ist.active.tolist())))


def test_only_the_chosen_units_get_gradients_and_the_scores_move():
    ist = IST(r=2, update_interval=4, seed=3)
    record = RecordGradients(ist)
    module = tiny_vit()
    quiet_trainer(max_steps=9, callbacks=[ist, record]).fit(module, datamodule=DigitsDataModule(batch_size=64))
    # patch embedding + 3 blocks = 4 units; a quarter trains per step, half is suppressed per scoring pass
    assert ist.units == ["backbone.patch_embed.proj", "backbone.blocks.0", "backbone.blocks.1", "backbone.blocks.2"]
    assert ist.n_update == 1 and ist.n_suppress == 2
    assert len(record.steps) == 9
    for with_gradient, active in record.steps:
        assert with_gradient == active and len(active) == 1
    assert len({frozenset(active) for _, active in record.steps}) > 1  # the choice changes between steps
    assert int(ist.update_counts.sum()) == 9
    assert ist.importance.ne(0).any()  # scored at steps 4 and 8
    # after the fit every adapter trains again, as the surgery left them
    assert all(p.requires_grad for params in ist.unit_parameters for p in params)


def test_bert_units_are_its_encoder_layers(tmp_path):
    module, loader = tiny_bert(tmp_path, num_hidden_layers=4)
    ist = IST(r=2, update_interval=2, target_modules=["query", "key", "value", "dense"])
    record = RecordGradients(ist)
    quiet_trainer(max_steps=4, callbacks=[ist, record]).fit(module, loader)
    layer_units = [u for u in ist.units if ".encoder.layer." in u]
    assert len(layer_units) == 4 and all(u.endswith(f"layer.{i}") for i, u in enumerate(layer_units))
    assert all(with_gradient == active for with_gradient, active in record.steps)
    assert ist.importance.ne(0).any()


def test_resumed_state_must_fit_the_model():
    ist = IST(r=2)
    ist.load_state_dict({"importance": torch.zeros(7), "update_counts": torch.zeros(7, dtype=torch.long), "seed": 0})
    with pytest.raises(TechniqueConfigError, match="7 units, the module has 4"):
        quiet_trainer(max_steps=1, callbacks=[ist]).fit(tiny_vit(), datamodule=DigitsDataModule(batch_size=64))


class SaveState(L.Callback):
    def __init__(self, ist: IST, directory) -> None:
        self.ist, self.directory = ist, directory

    def on_train_end(self, trainer, pl_module):
        torch.save({**self.ist.state_dict(), "active": self.ist.active}, self.directory / f"rank{trainer.global_rank}.pt")


@pytest.mark.slow
def test_ddp_ranks_keep_the_same_scores_and_choices(tmp_path):
    # each rank scores on its own batch: the losses are averaged over the ranks, so the scores agree
    ist = IST(r=2, update_interval=2, seed=1)
    trainer = quiet_trainer(max_steps=5, devices=2, strategy=ddp_strategy(), callbacks=[ist, SaveState(ist, tmp_path)])
    trainer.fit(tiny_vit(), datamodule=DigitsDataModule(batch_size=32))
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    assert rank0["importance"].ne(0).any()
    for key in ("importance", "update_counts", "active"):
        assert torch.equal(rank0[key], rank1[key]), key
