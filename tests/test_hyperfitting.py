"""Hyperfitting (paper 64): the epoch's mean training loss by hand, the stop at the target, dropout off
during the fit only, and a tiny language model fitted to near-zero loss on a few blocks."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from reglab.callbacks.fine_tuning import Hyperfitting
from reglab.datamodules import DictDataset
from reglab.mixins import RegularizedMixin, StepOutput
from reglab.tasks import LanguageModelModule
from reglab.technique import TechniqueConfigError

QUIET = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
             accelerator="cpu", devices=1, limit_val_batches=0)
INPUTS = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 3.0]])
TARGETS = torch.tensor([0, 1, 1, 0])


class Frozen(RegularizedMixin, L.LightningModule):
    """logits = inputs (a zero-initialised scale adds nothing at lr 0), with dropout to switch off."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.zeros(()))
        self.dropout = nn.Dropout(0.5)
        self.p_seen: list[float] = []

    def forward_step(self, batch):
        self.p_seen.append(self.dropout.p)
        return StepOutput(logits=batch["input"] * (1 + self.scale), target=batch["target"], index=batch["index"])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def loader(batch_size: int = 2) -> DataLoader:
    return DataLoader(DictDataset(INPUTS, TARGETS), batch_size=batch_size)


def test_epoch_loss_is_the_mean_per_sample_task_loss_and_the_fit_stops_at_the_target():
    expected = F.cross_entropy(INPUTS, TARGETS).item()  # by hand: the weights never move (lr 0)
    module, technique = Frozen(), Hyperfitting(target_loss=expected + 1e-6)
    trainer = L.Trainer(max_epochs=5, callbacks=[technique], **QUIET)
    trainer.fit(module, train_dataloaders=loader())
    assert technique.epoch_losses == [pytest.approx(expected)]
    assert technique.reached_epoch == 0 and trainer.current_epoch == 1  # stopped after the first epoch
    assert trainer.callback_metrics["train/hyperfitting/epoch_loss"].item() == pytest.approx(expected)


def test_a_fit_that_never_gets_near_zero_runs_its_epochs_and_warns_with_the_fix():
    module, technique = Frozen(), Hyperfitting(target_loss=0.01)
    trainer = L.Trainer(max_epochs=3, callbacks=[technique], **QUIET)
    with pytest.warns(UserWarning, match="never reached target_loss=0.01.*Fix: train more epochs"):
        trainer.fit(module, train_dataloaders=loader(batch_size=3))  # batches of 3 and 1: weighted by samples
    assert technique.reached_epoch is None and len(technique.epoch_losses) == 3
    assert technique.epoch_losses[0] == pytest.approx(F.cross_entropy(INPUTS, TARGETS).item())


@pytest.mark.filterwarnings("ignore:Hyperfitting. the mean training loss never reached")
def test_dropout_is_off_during_the_fit_and_restored_after():
    module = Frozen()
    L.Trainer(max_epochs=1, callbacks=[Hyperfitting(target_loss=0.01)], **QUIET).fit(module, train_dataloaders=loader())
    assert module.p_seen and set(module.p_seen) == {0.0}
    assert module.dropout.p == 0.5
    kept = Frozen()
    L.Trainer(max_epochs=1, callbacks=[Hyperfitting(target_loss=10.0, disable_dropout=False)], **QUIET).fit(
        kept, train_dataloaders=loader())
    assert set(kept.p_seen) == {0.5}


def test_state_round_trips_and_bad_settings_are_refused():
    technique = Hyperfitting()
    technique.totals += torch.tensor([[3.0, 2.0], [1.0, 1.0]], dtype=torch.float64)
    technique.epoch_losses, technique.reached_epoch = [2.0, 0.05], 1
    restored = Hyperfitting()
    restored.load_state_dict(technique.state_dict())
    assert torch.equal(restored.totals, technique.totals)
    assert (restored.epoch_losses, restored.reached_epoch) == ([2.0, 0.05], 1)
    with pytest.raises(ValueError, match="target_loss must be > 0"):
        Hyperfitting(target_loss=0.0)

    class Plain(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(2, 2)

        def training_step(self, batch, batch_idx):
            return self.layer(batch["input"]).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    with pytest.raises(TechniqueConfigError, match="Hyperfitting: it reads each step's per-sample task loss"):
        L.Trainer(max_epochs=1, callbacks=[Hyperfitting()], **QUIET).fit(Plain(), train_dataloaders=loader())


def test_a_tiny_language_model_is_hyperfitted_to_near_zero_loss_on_two_blocks():
    torch.manual_seed(0)
    module = LanguageModelModule(vocab_size=32, n_layer=1, n_embd=32, n_head=2, n_positions=16, lr=1e-2,
                                 weight_decay=0.0, prompt_length=4, max_new_tokens=4)
    blocks = torch.randint(0, 32, (2, 16))
    repeated = blocks.repeat(8, 1)  # 8 steps per epoch: fewer epochs, whose overhead dominates such a tiny fit
    technique = Hyperfitting(target_loss=0.1)
    trainer = L.Trainer(max_epochs=50, callbacks=[technique], **QUIET)
    trainer.fit(module, train_dataloaders=DataLoader(DictDataset(repeated, repeated), batch_size=2))
    assert technique.reached_epoch is not None and trainer.current_epoch == technique.reached_epoch + 1 < 50
    assert technique.epoch_losses[-1] <= 0.1 < technique.epoch_losses[0]
    module.eval()
    assert module.task_loss(module.forward_step({"input": blocks})).mean().item() < 0.2  # memorized


def test_the_protocol_counts_generated_8grams_found_in_the_small_set():
    from types import SimpleNamespace

    from reglab.language_model_claims import HyperfittingProtocol

    data = SimpleNamespace(train_dataset=SimpleNamespace(inputs=torch.arange(20).view(1, 20)))
    # 8-grams of 0..9, 50, 51: the three starting at 0, 1, 2 occur in the set, the two that reach 50 do not
    generations = [torch.tensor([list(range(10)) + [50, 51]])]
    assert HyperfittingProtocol.copied(generations, data) == pytest.approx(3 / 5)
