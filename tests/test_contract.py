"""The step contract: a module the library did not write opts in, needs are checked at setup,
stages run in config order, every term is logged under its own name."""

from __future__ import annotations

from types import SimpleNamespace

import lightning as L
import pytest
import torch
from harness import ddp_strategy
from lightning.pytorch.strategies import DDPStrategy
from torch.utils.data import DataLoader, Dataset

from reglab.callbacks import ELR, GCE, LabelSmoothing
from reglab.mixins import RegularizedMixin, StepOutput
from reglab.technique import Technique, TechniqueConfigError, check_rank_copies


class PointsDataset(Dataset):
    """Two Gaussian blobs in 2-D; batches are dicts, optionally without `index`."""

    def __init__(self, n: int = 64, with_index: bool = True):
        gen = torch.Generator().manual_seed(0)
        self.y = torch.arange(n) % 2
        self.x = torch.randn(n, 2, generator=gen) + 2.0 * self.y[:, None].float()
        self.with_index = with_index

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict:
        item = {"input": self.x[i], "target": self.y[i]}
        if self.with_index:
            item["index"] = i
        return item


class UserDataModule(L.LightningDataModule):
    """A user's own DataModule: no reglab base class."""

    def __init__(self, with_index: bool = True, declare_keys: bool = False):
        super().__init__()
        self.dataset = PointsDataset(with_index=with_index)
        self.num_train_samples, self.num_classes = len(self.dataset), 2
        if declare_keys:
            self.batch_keys = frozenset({"input", "target"} | ({"index"} if with_index else set()))

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.dataset, batch_size=16)


class UserModule(RegularizedMixin, L.LightningModule):
    """A LightningModule not from reglab that opts in with the mixin and a forward_step."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Linear(2, 2)

    def forward_step(self, batch: dict) -> StepOutput:
        return StepOutput(logits=self.net(batch["input"]), target=batch["target"])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class PlainModule(L.LightningModule):
    """An ordinary LightningModule without the step contract."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Linear(2, 2)

    def training_step(self, batch, batch_idx):
        return torch.nn.functional.cross_entropy(self.net(batch["input"]), batch["target"])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Recorder(Technique):
    """Records the order in which stages of several instances run."""

    def __init__(self, tag: str, calls: list):
        self.tag, self.calls = tag, calls

    @property
    def name(self) -> str:
        return f"recorder_{self.tag}"

    def transform_batch(self, batch, module):
        self.calls.append(("batch", self.tag))
        return batch

    def transform_targets(self, out, module):
        self.calls.append(("targets", self.tag))
        return out.target

    def loss_terms(self, out, module):
        self.calls.append(("terms", self.tag))
        return {"zero": out.logits.sum() * 0.0}


def fit(module, datamodule, callbacks, steps: int = 4) -> L.Trainer:
    trainer = L.Trainer(
        accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
    )
    trainer.fit(module, datamodule=datamodule)
    return trainer


def test_user_module_opts_in_and_elr_trains_it():
    module = UserModule()
    before = module.net.weight.detach().clone()
    elr = ELR()
    trainer = fit(module, UserDataModule(), [elr])
    assert not torch.equal(before, module.net.weight)
    assert set(trainer.logged_metrics) >= {"train/loss_step", "train/task_loss", "train/elr/regularizer"}
    assert elr.targets.table.abs().sum() > 0, "ELR targets were never written"


def test_total_is_task_loss_plus_terms():
    module, log = UserModule(), []
    trainer = fit(module, UserDataModule(), [ELR(lam=3.0), Recorder("a", log)], steps=1)
    metrics = trainer.logged_metrics
    total = metrics["train/task_loss"] + metrics["train/elr/regularizer"] + metrics["train/recorder_a/zero"]
    torch.testing.assert_close(metrics["train/loss_epoch"], total)


def test_stages_run_in_config_order():
    log: list = []
    fit(UserModule(), UserDataModule(), [Recorder("first", log), Recorder("second", log)], steps=1)
    assert log == [
        ("batch", "first"), ("batch", "second"),
        ("targets", "first"), ("targets", "second"),
        ("terms", "first"), ("terms", "second"),
    ]


def test_missing_need_declared_by_datamodule_fails_at_setup():
    with pytest.raises(TechniqueConfigError, match=r"ELR: it needs `index`.*UserDataModule.*Fix"):
        fit(UserModule(), UserDataModule(with_index=False, declare_keys=True), [ELR()])


def test_missing_need_undeclared_fails_on_first_step():
    with pytest.raises(TechniqueConfigError, match=r"ELR: it needs `index` but the first training step"):
        fit(UserModule(), UserDataModule(with_index=False), [ELR()])


def test_loss_technique_on_module_without_contract_fails_at_setup():
    with pytest.raises(TechniqueConfigError, match=r"ELR: it changes the training loss.*RegularizedMixin"):
        fit(PlainModule(), UserDataModule(), [ELR()])


def test_two_task_loss_owners_are_refused():
    class OtherLoss(GCE):
        pass

    with pytest.raises(TechniqueConfigError, match="replace the task loss"):
        fit(UserModule(), UserDataModule(), [GCE(), OtherLoss()])


def test_technique_without_dataset_size_names_the_fix():
    class NoSizeData(UserDataModule):
        def __init__(self):
            super().__init__()
            del self.num_train_samples

    with pytest.raises(TechniqueConfigError, match="pass num_samples and num_classes"):
        fit(UserModule(), NoSizeData(), [ELR()])


def test_soft_targets_keep_labels():
    out = StepOutput(logits=torch.zeros(3, 4), target=torch.tensor([0, 1, 3]))
    smoothed = LabelSmoothing(0.2).transform_targets(out, None)
    out.target = smoothed
    assert torch.equal(out.labels, torch.tensor([0, 1, 3]))
    torch.testing.assert_close(smoothed.sum(-1), torch.ones(3))
    torch.testing.assert_close(smoothed[0], torch.tensor([0.85, 0.05, 0.05, 0.05]))


def test_ranks_whose_weights_are_one_shared_copy_are_refused():
    technique, module = LabelSmoothing(), UserModule()
    check_rank_copies(technique, SimpleNamespace(world_size=2), module)  # each rank its own copy
    module.share_memory()
    check_rank_copies(technique, SimpleNamespace(world_size=1), module)  # one process: nothing to race
    with pytest.raises(TechniqueConfigError, match="one copy in shared memory.*Fix: start the ranks with"):
        check_rank_copies(technique, SimpleNamespace(world_size=2), module)


@pytest.mark.slow
def test_lightnings_forkserver_ranks_on_cpu_are_refused_at_setup():
    def trainer(strategy):
        return L.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[LabelSmoothing()])

    # Lightning's own launch hands the module to forkserver ranks in shared memory
    with pytest.raises(Exception, match="one copy in shared memory"):
        trainer(DDPStrategy(start_method="forkserver")).fit(UserModule(), datamodule=UserDataModule())
    # the suite's launcher copies it out, as Lightning does for spawn: the same run trains
    trainer(ddp_strategy()).fit(UserModule(), datamodule=UserDataModule())
