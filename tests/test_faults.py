"""What a careful user runs and sees when something is wrong (issue 10): one case per row, the
call, the message it must show, and that nothing was lost.

Cases run the ``reglab`` command in-process (``main([...])``) or the Python API on tiny runs
(flat digits, an MLP, a few steps); only those that need a real second process (a live lock
holder, Ctrl-C) start one.
"""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
import yaml
from torch.utils.data import DataLoader, Dataset

from reglab.callbacks import ELR, PSKD
from reglab.callbacks.fine_tuning import PretrainedWeights
from reglab.callbacks.self_distillation import KnowledgeDistillation
from reglab.cli import ReglabCLI, main, merge_technique_configs
from reglab.datamodules import ClassificationDataModule, DigitsDataModule
from reglab.mixins import RegularizedMixin, StepOutput
from reglab.tasks import ClassificationModule
from reglab.technique import TechniqueConfigError

TINY = {
    "seed_everything": 0,
    "run_name": "tiny",
    "trainer": {
        "accelerator": "cpu", "devices": 1, "max_epochs": 1, "log_every_n_steps": 1,
        "enable_progress_bar": False, "enable_model_summary": False, "num_sanity_val_steps": 0,
        "limit_val_batches": 1, "limit_test_batches": 1,
    },
    "data": {
        "class_path": "reglab.datamodules.DigitsDataModule",
        "init_args": {"flatten": True, "batch_size": 256, "label_noise": {"rate": 0.4}},
    },
    "model": {
        "class_path": "reglab.tasks.ClassificationModule",
        "init_args": {"backbone": "mlp", "backbone_kwargs": {"hidden_sizes": [32]}, "lr": 0.01},
    },
    "techniques": {"elr": {"class_path": "reglab.callbacks.ELR", "init_args": {"beta": 0.7, "lam": 3.0}}},
}
STEPS_PER_EPOCH = 5  # flat digits' training split at batch 256


def tiny_config(tmp_path: Path) -> list[str]:
    tmp_path.mkdir(exist_ok=True)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return ["--config", str(path), f"--runs_dir={tmp_path / 'runs'}"]


def fit(tmp_path: Path, *args: str) -> None:
    main(["fit", *tiny_config(tmp_path), *args])


def run_dir(tmp_path: Path, version: int = 0) -> Path:
    return tmp_path / "runs" / "tiny" / f"version_{version}"


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def assert_kept(before: dict[str, bytes], folder: Path, may_change: str | None = None) -> None:
    """Every file that was in ``folder`` is still there unchanged; ``metrics.csv`` files may only
    have grown (their earlier rows come first, with the same values). Files under ``may_change``
    (a resumed run's ``checkpoints/``: last.ckpt moves on, top-k keeps its k) are not compared."""
    for name, content in before.items():
        path = folder / name
        if may_change and name.startswith(may_change):
            continue
        assert path.is_file(), f"{name} was deleted"
        if name.endswith("metrics.csv"):
            old = list(csv.DictReader(content.decode().splitlines()))
            new = rows(path)[: len(old)]
            assert [{k: row[k] for k in old_row} for row, old_row in zip(new, old)] == old, f"{name} lost rows"
        elif not name.endswith("hparams.yaml"):
            assert path.read_bytes() == content, f"{name} was overwritten"


def weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return torch.load(checkpoint, weights_only=False)["state_dict"]


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], rtol=0, atol=0, msg=key)


# --- item 1: run folders ---------------------------------------------------------------------


def test_resume_keeps_every_log_row_and_the_config_of_each_start(tmp_path):
    fit(tmp_path)
    run = run_dir(tmp_path)
    before = snapshot(run)
    fit(tmp_path, "--trainer.max_epochs=2", "--ckpt_path", "last")
    assert_kept(before, run, may_change="checkpoints/")
    assert (run / "config.1.yaml").is_file(), sorted(p.name for p in run.iterdir())
    assert yaml.safe_load((run / "config.1.yaml").read_text())["ckpt_path"].endswith("last.ckpt")
    epochs = {row["epoch"] for row in rows(run / "metrics.csv") if row["epoch"]}
    assert epochs == {"0", "1"}, "the resumed epoch continues the same metrics.csv"
    assert len(list(run.glob("events.out.tfevents.*"))) == 2, "TensorBoard adds an event file per start"
    assert not run_dir(tmp_path, 1).exists()


def test_truncated_last_checkpoint_is_refused_and_the_run_is_untouched(tmp_path):
    fit(tmp_path)
    run = run_dir(tmp_path)
    last = run / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # killed while saving
    before = snapshot(run)
    with pytest.raises(SystemExit, match=r"last\.ckpt is incomplete.*nothing in .*version_0 was changed"):
        fit(tmp_path, "--trainer.max_epochs=2", "--ckpt_path", "last")
    assert snapshot(run) == before
    assert not run_dir(tmp_path, 1).exists()


def test_a_start_that_fails_before_its_first_step_leaves_no_version_folder(tmp_path):
    fit(tmp_path)
    before = snapshot(run_dir(tmp_path))
    with pytest.raises(Exception):  # 10 digit classes, a 3-class head: fails in the first step
        fit(tmp_path, "--model.init_args.num_classes=3")
    assert not run_dir(tmp_path, 1).exists(), "the failed start left its version folder behind"
    assert snapshot(run_dir(tmp_path)) == before


@pytest.mark.parametrize("subcommand", ["validate", "test"])
def test_validate_and_test_on_a_run_write_beside_its_logs(subcommand, tmp_path, capsys):
    fit(tmp_path)
    run = run_dir(tmp_path)
    before = snapshot(run)
    main([subcommand, *tiny_config(tmp_path), "--ckpt_path", "last"])
    assert_kept(before, run)
    own = run / f"{subcommand}_0"
    stage = "val" if subcommand == "validate" else "test"
    assert any(f"{stage}/acc" in row and row[f"{stage}/acc"] for row in rows(own / "metrics.csv"))
    assert (own / "config.yaml").is_file()
    first = snapshot(own)
    main([subcommand, *tiny_config(tmp_path), "--ckpt_path", "last"])
    assert (run / f"{subcommand}_1" / "metrics.csv").is_file()
    assert_kept(first, own)


def test_two_runs_started_at_once_get_different_folders(tmp_path):
    from jsonargparse import Namespace

    from reglab.cli import open_run_folder

    config = Namespace(runs_dir=str(tmp_path / "runs"), run_name="tiny")
    first, second = open_run_folder(config, "fit"), open_run_folder(config, "fit")  # neither wrote anything yet
    assert first.path != second.path
    assert first.path.is_dir() and second.path.is_dir(), "a version is reserved when the command starts"
    for folder in (first, second):
        folder.close(keep=False)
        assert not folder.path.exists(), "a start that never trained leaves no folder"


def test_a_live_run_holds_its_folder_and_a_dead_one_does_not(tmp_path):
    fit(tmp_path)
    run = run_dir(tmp_path)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from reglab.run_folder import RunFolder; "
         "RunFolder.existing(sys.argv[1]); print('locked', flush=True); time.sleep(600)", str(run)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = snapshot(run)
        with pytest.raises(SystemExit, match=rf"{run} is in use by process {holder.pid}"):
            fit(tmp_path, "--trainer.max_epochs=2", "--ckpt_path", "last")
        assert snapshot(run) == before
    finally:
        holder.kill()  # SIGKILL: its lock file stays behind, naming a dead process
        holder.wait()
    fit(tmp_path, "--trainer.max_epochs=2", "--ckpt_path", "last")
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["epoch"] == 1
    assert not (run / "reglab.lock").exists(), "the lock is released when the command ends"


# --- item 2: non-finite losses ---------------------------------------------------------------


def test_a_diverging_loss_stops_the_run_and_keeps_the_last_finite_checkpoint(tmp_path, capsys):
    fit(tmp_path)
    run = run_dir(tmp_path)
    last = run / "checkpoints" / "last.ckpt"
    before = snapshot(run)
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        fit(tmp_path, "--trainer.max_epochs=3", "--techniques.elr.init_args.lam=1e39", "--ckpt_path", "last")
    message = str(stopped.value.code)
    assert f"train/elr/regularizer became non-finite at step {STEPS_PER_EPOCH + 1} (epoch 1)" in message, message
    assert f"The last finite checkpoint is kept: {last}" in message, message
    assert "test accuracy (clean labels)" not in capsys.readouterr().out, "no success summary"
    assert_kept(before, run)  # last.ckpt included: byte for byte the finite one
    assert all(torch.isfinite(value).all() for value in weights(last).values() if value.is_floating_point())


class NaNInputs(ClassificationDataModule):
    """Two classes, three features, one NaN in the training inputs."""

    num_classes, input_shape = 2, (3,)

    def _load_splits(self):
        inputs, labels = torch.randn(8, 3), torch.tensor([0, 1] * 4)
        inputs[5, 1] = float("nan")
        return {"train": (inputs, labels), "val": (inputs[:4], labels[:4]), "test": (inputs[:4], labels[:4])}


def test_non_finite_inputs_are_refused_at_setup():
    with pytest.raises(ValueError, match=r"'train' split has NaN or infinite inputs in 1 samples, e.g. at positions \[5\]"):
        NaNInputs(batch_size=4).setup("fit")


# --- item 3: exact resume after any stop -----------------------------------------------------


def test_resume_after_max_steps_is_exact(tmp_path):
    budget = 2 * STEPS_PER_EPOCH + 2
    straight = tmp_path / "straight"
    fit(straight, f"--trainer.max_steps={budget}", "--trainer.max_epochs=-1")
    fit(tmp_path, f"--trainer.max_steps={STEPS_PER_EPOCH + 2}", "--trainer.max_epochs=-1")  # stops mid-epoch 1
    fit(tmp_path, f"--trainer.max_steps={budget}", "--trainer.max_epochs=-1", "--ckpt_path", "last")
    last = run_dir(tmp_path) / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == budget
    assert_same_weights(run_dir(straight) / "checkpoints" / "last.ckpt", last)


def test_resume_from_an_epoch_end_with_a_step_budget_is_exact(tmp_path):
    budget = 2 * STEPS_PER_EPOCH + 2
    fit(tmp_path)  # one whole epoch: last.ckpt is written at its end
    fit(tmp_path, f"--trainer.max_steps={budget}", "--trainer.max_epochs=-1", "--ckpt_path", "last")
    straight = tmp_path / "straight"
    fit(straight, f"--trainer.max_steps={budget}", "--trainer.max_epochs=-1")
    assert_same_weights(run_dir(straight) / "checkpoints" / "last.ckpt", run_dir(tmp_path) / "checkpoints" / "last.ckpt")


def test_resume_after_max_time_is_exact(tmp_path):
    fit(tmp_path, "--trainer.max_time=00:00:00:01", "--trainer.max_epochs=-1")
    stopped_at = torch.load(run_dir(tmp_path) / "checkpoints" / "last.ckpt", weights_only=False)["global_step"]
    budget = stopped_at + STEPS_PER_EPOCH + 2
    fit(tmp_path, f"--trainer.max_steps={budget}", "--trainer.max_epochs=-1", "--ckpt_path", "last")
    straight = tmp_path / "straight"
    fit(straight, f"--trainer.max_steps={budget}", "--trainer.max_epochs=-1")
    assert_same_weights(run_dir(straight) / "checkpoints" / "last.ckpt", run_dir(tmp_path) / "checkpoints" / "last.ckpt")


class SigtermAt(L.Callback):
    """Sends this process SIGTERM after ``step`` (Lightning then stops the fit gracefully)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def test_resume_after_sigterm_loses_no_step_and_is_exact(tmp_path):
    budget, stop = 2 * STEPS_PER_EPOCH + 2, STEPS_PER_EPOCH + 2
    terminate = tmp_path / "sigterm.yaml"
    terminate.write_text(yaml.safe_dump({"trainer": {"callbacks": [
        {"class_path": f"{__name__}.SigtermAt", "init_args": {"step": stop}}]}}))
    with pytest.raises(SystemExit) as stopped:  # not status 0: a preempted run must not look finished
        fit(tmp_path, "--config", str(terminate), "--trainer.max_epochs=-1", f"--trainer.max_steps={budget}")
    assert stopped.value.code == 143
    run = run_dir(tmp_path)
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == stop
    before = snapshot(run)
    fit(tmp_path, f"--trainer.max_steps={budget}", "--trainer.max_epochs=-1", "--ckpt_path", "last")
    assert_kept(before, run, may_change="checkpoints/")
    straight = tmp_path / "straight"
    fit(straight, f"--trainer.max_steps={budget}", "--trainer.max_epochs=-1")
    assert_same_weights(run_dir(straight) / "checkpoints" / "last.ckpt", run / "checkpoints" / "last.ckpt")


def test_resume_after_mid_epoch_early_stopping_is_exact(tmp_path):
    budget, every = 2 * STEPS_PER_EPOCH + 2, "--trainer.val_check_interval=2"  # validate every 2 steps
    stopping = tmp_path / "early_stopping.yaml"  # no improvement of 10 in val/loss: stops at the 2nd validation
    stopping.write_text(yaml.safe_dump({"trainer": {"callbacks": [{
        "class_path": "lightning.pytorch.callbacks.EarlyStopping",
        "init_args": {"monitor": "val/loss", "patience": 0, "min_delta": 10.0, "check_on_train_epoch_end": False},
    }]}}))
    fit(tmp_path, "--config", str(stopping), every, "--trainer.max_epochs=-1", "--trainer.max_steps=100")
    run = run_dir(tmp_path)
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 4  # mid-epoch 0
    before = snapshot(run)
    fit(tmp_path, every, "--trainer.max_epochs=-1", f"--trainer.max_steps={budget}", "--ckpt_path", "last")
    assert_kept(before, run, may_change="checkpoints/")
    straight = tmp_path / "straight"
    fit(straight, every, "--trainer.max_epochs=-1", f"--trainer.max_steps={budget}")
    assert_same_weights(run_dir(straight) / "checkpoints" / "last.ckpt", run / "checkpoints" / "last.ckpt")


def test_a_checkpoint_that_skips_the_rest_of_a_stopped_epoch_is_refused(tmp_path, capsys):
    # a run checkpointed by Lightning's own ModelCheckpoint, which saves a max_steps stop only
    # after marking the cut epoch as done (as every reglab run did before)
    run = run_dir(tmp_path)
    plain = tmp_path / "plain_checkpoint.yaml"
    plain.write_text(yaml.safe_dump({"trainer": {"callbacks": [{
        "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
        "init_args": {"dirpath": str(run / "checkpoints"), "save_last": True},
    }]}}))
    fit(tmp_path, "--config", str(plain), "--trainer.max_epochs=-1", f"--trainer.max_steps={STEPS_PER_EPOCH + 2}")
    before = snapshot(run)
    with pytest.raises(SystemExit, match=r"stopped in the middle of epoch 1 \(after 2 of its batches.*Fix: resume"):
        fit(tmp_path, "--trainer.max_epochs=-1", "--trainer.max_steps=20", "--ckpt_path", "last")
    assert_kept(before, run)
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == STEPS_PER_EPOCH + 2


def test_resume_after_ctrl_c_is_exact_and_keeps_the_logs(tmp_path):
    args = ["fit", *tiny_config(tmp_path), "--trainer.max_epochs=-1", "--trainer.max_steps=100000"]
    run = run_dir(tmp_path)
    # Ctrl-C's default action in the child: a pytest-xdist worker ignores SIGINT, and an ignored signal stays
    # ignored across exec (Python then installs no KeyboardInterrupt handler)
    process = subprocess.Popen([sys.executable, "-m", "reglab", *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 300
        while not (run / "checkpoints" / "last.ckpt").is_file() and time.monotonic() < deadline:
            time.sleep(0.2)
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode != 0, err.decode()[-2000:]
    stopped_at = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"]
    before = snapshot(run)
    budget = stopped_at + STEPS_PER_EPOCH + 2
    main([*args[:-1], f"--trainer.max_steps={budget}", "--ckpt_path", "last"])
    assert_kept(before, run, may_change="checkpoints/")
    straight = tmp_path / "straight"
    fit(straight, "--trainer.max_epochs=-1", f"--trainer.max_steps={budget}")
    assert_same_weights(run_dir(straight) / "checkpoints" / "last.ckpt", run / "checkpoints" / "last.ckpt")


class CrashAt(L.Callback):
    """Raises after ``step`` of task ``task`` (a crash in the middle of a task sequence)."""

    def __init__(self, task: int, step: int) -> None:
        self.task, self.step = task, step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.datamodule.task == self.task and trainer.global_step == self.step:
            raise RuntimeError("crashed")


def test_fit_tasks_resumed_after_a_crash_keeps_every_task_log_and_config(tmp_path):
    from reglab.continual.cli import main as fit_tasks

    split = {**TINY, "run_name": "split", "techniques": None, "data": {
        "class_path": "reglab.datamodules.TaskSequenceDataModule",
        "init_args": {"num_tasks": 2, "scenario": "class", "base": {
            "class_path": "reglab.datamodules.DigitsDataModule", "init_args": {"flatten": True, "batch_size": 64}}},
    }}
    config, crash = tmp_path / "split.yaml", tmp_path / "crash.yaml"
    config.write_text(yaml.safe_dump(split))
    crash.write_text(yaml.safe_dump({"trainer": {"callbacks": [
        {"class_path": f"{__name__}.CrashAt", "init_args": {"task": 1, "step": 6}}]}}))
    args = ["--config", str(config), f"--runs_dir={tmp_path / 'runs'}", "--checkpoint_every_n_steps=4"]
    with pytest.raises(RuntimeError, match="crashed"):
        fit_tasks([*args, "--config", str(crash)])
    run = tmp_path / "runs" / "split" / "version_0"
    assert rows(run / "tasks" / "task_1" / "metrics.csv"), "the crashed task logged rows"
    before = snapshot(run)
    fit_tasks([*args, "--ckpt_path", "last"])
    assert_kept(before, run, may_change="checkpoints/")
    assert (run / "config.1.yaml").is_file() and (run / "accuracy_matrix.json").is_file()
    assert not (run / "reglab.lock").exists()


REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"


# --- item 4: checks at setup ---


def _trainer(max_steps: int = 1, **kwargs) -> L.Trainer:
    return L.Trainer(max_steps=max_steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, accelerator="cpu",
                     **kwargs)


def _digits_mlp(**kwargs) -> ClassificationModule:
    shape = {"num_classes": 10, "input_shape": (64,), **kwargs}
    return ClassificationModule("mlp", backbone_kwargs={"hidden_sizes": (8,)}, **shape)


class _Samples(Dataset):
    """``n`` samples of 4 features with labels in ``[0, classes)``, as dict batches with ``index``."""

    def __init__(self, n: int, classes: int) -> None:
        generator = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(n, 4, generator=generator), torch.arange(n) % classes

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"input": self.x[i], "target": self.y[i], "index": i}


class _PlainData(L.LightningDataModule):
    """A DataModule not built on reglab's base: declares no num_classes / num_train_samples."""

    def __init__(self, n: int = 40, classes: int = 3) -> None:
        super().__init__()
        self.n, self.classes = n, classes

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_Samples(self.n, self.classes), batch_size=8)


@pytest.mark.parametrize("wrong", [{"num_classes": 5}, {"input_shape": (32,)}])
def test_model_built_for_other_data_fails_at_setup(wrong):
    key, value = next(iter(wrong.items()))
    with pytest.raises(ValueError, match=rf"built with {re.escape(f'{key}={value}')}.*DigitsDataModule has {key}=.*Fix: build the module "
                                         rf"with {key}=datamodule.{key}"):
        _trainer().fit(_digits_mlp(**wrong), datamodule=DigitsDataModule(flatten=True, batch_size=32))


@pytest.mark.parametrize("technique", [ELR, PSKD])
def test_per_sample_table_smaller_than_the_training_set_fails_at_setup(technique):
    data = DigitsDataModule(flatten=True, batch_size=32)
    name = technique.__name__
    with pytest.raises(TechniqueConfigError, match=rf"{name}: num_samples=100 is smaller than the \d+ training samples "
                                                   r"of DigitsDataModule.*Fix: leave num_samples unset"):
        _trainer(callbacks=[technique(num_samples=100)]).fit(_digits_mlp(), datamodule=data)


def test_per_sample_table_smaller_than_another_datamodules_training_set_fails_at_the_first_step():
    # the first batch holds samples 0..7 only: the table's 20 rows are checked against the dataset's 40
    module = ClassificationModule("mlp", num_classes=3, input_shape=(4,), backbone_kwargs={"hidden_sizes": (8,)})
    elr = ELR(num_samples=20, num_classes=3)
    with pytest.raises(TechniqueConfigError, match=r"ELR: its per-sample table has 20 rows.*at least 40 samples.*"
                                                   r"Fix: pass num_samples >= 40"):
        _trainer(max_steps=5, callbacks=[elr]).fit(module, datamodule=_PlainData(n=40))


def test_labels_out_of_range_from_another_datamodule_fail_at_the_first_step():
    module = ClassificationModule("mlp", num_classes=3, input_shape=(4,), backbone_kwargs={"hidden_sizes": (8,)})
    with pytest.raises(TechniqueConfigError, match=r"_PlainData: the first training batch has label 4, but "
                                                   r"ClassificationModule has 3 classes.*Fix: map the labels"):
        _trainer().fit(module, datamodule=_PlainData(classes=5))


class _OwnStep(RegularizedMixin, L.LightningModule):
    """A module that uses the mixin but computes its own loss in training_step (ignoring techniques)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Linear(4, 3)

    def forward_step(self, batch):
        return StepOutput(logits=self.net(batch["input"]), target=batch["target"], index=batch["index"])

    def training_step(self, batch, batch_idx):
        out = self.forward_step(batch)
        return F.cross_entropy(out.logits, out.target)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class _OwnStepWithContract(_OwnStep):
    def training_step(self, batch, batch_idx):
        loss, out, terms = self.regularized_step(batch)
        return loss


def test_own_training_step_that_skips_the_techniques_fails_at_the_first_step():
    elr = ELR(num_samples=40, num_classes=3)
    with pytest.raises(TechniqueConfigError, match=r"ELR: .*_OwnStep.training_step does not run the step contract, "
                                                   r"so the technique does nothing.*self.regularized_step\(batch\)"):
        _trainer(callbacks=[elr]).fit(_OwnStep(), datamodule=_PlainData())
    elr = ELR(num_samples=40, num_classes=3)  # a training_step that runs the contract is accepted and ELR acts
    _trainer(max_steps=2, callbacks=[elr]).fit(_OwnStepWithContract(), datamodule=_PlainData())
    assert elr.targets.table.abs().sum() > 0


def test_mixin_after_lightningmodule_fails_when_the_class_is_defined():
    with pytest.raises(TypeError, match=r"Wrong: RegularizedMixin comes after LightningModule.*Fix: list the mixin "
                                        r"first: class Wrong\(RegularizedMixin, LightningModule\)"):
        class Wrong(L.LightningModule, RegularizedMixin):
            def forward_step(self, batch):
                raise AssertionError("never reached")


def test_technique_reused_for_another_models_fit_is_refused():
    data = DigitsDataModule(flatten=True, batch_size=32)
    elr, first = ELR(), _digits_mlp()
    _trainer(callbacks=[elr]).fit(first, datamodule=data)
    table = elr.targets.table.clone()
    with pytest.raises(TechniqueConfigError, match=r"ELR: this ELR object already trained another model.*"
                                                   r"Fix: build a new ELR\(...\) for every fit"):
        _trainer(callbacks=[elr]).fit(_digits_mlp(), datamodule=data)
    assert torch.equal(elr.targets.table, table)  # the first fit's state is untouched
    _trainer(max_steps=2, callbacks=[elr]).fit(first, datamodule=data)  # the same model continues


def _bad_technique_file(tmp_path: Path) -> Path:
    path = tmp_path / "elr_typo.yaml"
    path.write_text("techniques:\n  elr:\n    class_path: reglab.callbacks.ELR\n    init_args: {beta: 0.7, lamm: 3.0}\n")
    return path


def test_misspelled_technique_argument_names_the_file_the_key_and_the_closest_name(tmp_path):
    bad = _bad_technique_file(tmp_path)
    with pytest.raises(SystemExit, match=rf"{bad}: `techniques.elr.init_args.lamm` is not an argument of "
                                         r"reglab.callbacks.ELR. Fix: did you mean `lam`\?"):
        main(["fit", "--config", str(CONFIGS / "experiment/quickstart.yaml"), "--config", str(bad),
              f"--runs_dir={tmp_path}"])
    assert not (tmp_path / "quickstart").exists()


def test_misspelled_callback_argument_is_named_too(tmp_path):
    bad = tmp_path / "callbacks.yaml"
    bad.write_text(yaml.safe_dump({"trainer": {"callbacks": [{"class_path": "reglab.callbacks.fine_tuning.PretrainedWeights",
                                                              "init_args": {"pretrain_confg": "x.yaml"}}]}}))
    with pytest.raises(SystemExit, match=r"`trainer.callbacks\[0\].init_args.pretrain_confg`.*did you mean `pretrain_config`"):
        merge_technique_configs(["--config", str(CONFIGS / "experiment/quickstart.yaml"), "--config", str(bad)])


def test_technique_file_without_a_data_file_says_which_file_is_missing(tmp_path):
    elr = CONFIGS / "technique/elr.yaml"
    with pytest.raises(SystemExit, match=rf"no `data:` and no `model:` section in {elr}, so the data and the model config "
                                         r"files are missing. Fix: pass them.*configs/data/digits.yaml"):
        main(["fit", "--config", str(elr), f"--runs_dir={tmp_path}"])
    with pytest.raises(SystemExit, match=r"no `data:` section in .*so the data config file is missing"):
        main(["fit", "--config", str(CONFIGS / "model/cnn.yaml"), "--config", str(elr), f"--runs_dir={tmp_path}"])


PATH_KEYS = ("pretrain_config", "teacher_config", "checkpoint", "teacher_checkpoint", "cache_dir")


def _marked_paths(argv: list[str]) -> list[str]:
    """The values of the path arguments the CLI rewrote (callbacks and techniques)."""
    found = []
    for arg in argv:
        if arg.startswith(("--trainer.callbacks=", "--techniques=")):
            entries = json.loads(arg.split("=", 1)[1])
            entries = entries.values() if isinstance(entries, dict) else entries
            for entry in entries:
                for key in PATH_KEYS:
                    if key in entry.get("init_args", {}):
                        found.append(entry["init_args"][key])
    return found


def test_nested_config_paths_in_configs_resolve_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    named = []
    for path in sorted(CONFIGS.rglob("*.yaml")):
        complete = ["--config", str(CONFIGS / "data/digits.yaml"), "--config", str(CONFIGS / "model/cnn.yaml")]
        named += _marked_paths(merge_technique_configs(["--config", str(path), *complete]))
    in_files = [line for path in CONFIGS.rglob("*.yaml") for line in path.read_text().splitlines()
                if re.match(rf"\s+({'|'.join(PATH_KEYS)}):", line)]
    assert in_files and len(named) == len(in_files), (named, in_files)  # every one was rewritten
    for value in named:
        assert Path(value).is_absolute() and Path(value).is_file(), value


def test_nested_config_paths_and_caches_resolve_relative_to_the_file_that_names_them(tmp_path, monkeypatch):
    folder = tmp_path / "experiments"
    folder.mkdir()
    (folder / "teacher.yaml").write_text("seed_everything: 0\n")
    (folder / "pretrain.yaml").write_text("seed_everything: 0\n")
    student = folder / "student.yaml"
    student.write_text(yaml.safe_dump({
        "trainer": {"callbacks": [{"class_path": "reglab.callbacks.fine_tuning.PretrainedWeights",
                                   "init_args": {"pretrain_config": "pretrain.yaml", "cache_dir": "cache"}}]},
        "techniques": {"kd": {"class_path": "reglab.callbacks.KnowledgeDistillation",
                              "init_args": {"teacher_config": "teacher.yaml", "cache_dir": "../cache"}}},
    }))
    monkeypatch.chdir(tmp_path.parent)  # any other directory
    built = ReglabCLI(args=merge_technique_configs(["--config", str(CONFIGS / "experiment/quickstart.yaml"),
                                                    "--config", str(student), f"--runs_dir={tmp_path}"]), run=False)
    (start,) = [cb for cb in built.trainer.callbacks if isinstance(cb, PretrainedWeights)]
    (kd,) = [cb for cb in built.trainer.callbacks if isinstance(cb, KnowledgeDistillation)]
    assert (start.pretrain_config, start.cache_dir) == (str(folder / "pretrain.yaml"), str(folder / "cache"))
    assert (kd.teacher_config, kd.cache_dir) == (str(folder / "teacher.yaml"), str(tmp_path / "cache"))


def test_commands_run_without_lightningclis_args_warning(tmp_path, monkeypatch):
    args = ["--config", str(CONFIGS / "experiment/quickstart.yaml"), f"--runs_dir={tmp_path}"]
    monkeypatch.setattr(sys, "argv", ["reglab", *args])  # as the console script sees them
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ReglabCLI(args=merge_technique_configs(args), run=False)
    messages = [str(w.message) for w in caught]
    assert not [m for m in messages if "args parameter is intended" in m], messages
    assert sys.argv == ["reglab", *args]


# --- item 6: soups ---


@pytest.fixture
def two_ingredients(tmp_path):
    """Two checkpoints of one tiny architecture (no training: refusals happen before averaging)."""
    paths = []
    for name in ("a", "b"):
        module = ClassificationModule("mlp", num_classes=3, input_shape=(4,), backbone_kwargs={"hidden_sizes": (4,)})
        torch.save({"state_dict": module.state_dict()}, tmp_path / f"{name}.ckpt")
        paths.append(tmp_path / f"{name}.ckpt")
    return paths


def _soup(*checkpoints: Path | str, out: Path | str, extra: tuple[str, ...] = ()) -> None:
    main(["soup", "--checkpoints", *map(str, checkpoints), "--method", "uniform", "--out", str(out), *extra])


@pytest.mark.parametrize("spelling", ["same path", "other spelling", "symlink"])
def test_soup_out_equal_to_an_ingredient_is_refused_and_the_ingredient_kept(two_ingredients, spelling, tmp_path):
    a, b = two_ingredients
    out = {"same path": a, "other spelling": tmp_path / "sub" / ".." / "a.ckpt", "symlink": tmp_path / "link.ckpt"}[spelling]
    (tmp_path / "sub").mkdir()
    if spelling == "symlink":
        os.symlink(a, out)
    before = a.read_bytes()
    with pytest.raises(SystemExit, match=r"is the ingredient .*a\.ckpt.*destroy.*Fix: choose another --out"):
        _soup(a, b, out=out)
    assert a.read_bytes() == before


def test_soup_report_equal_to_an_ingredient_is_refused(two_ingredients, tmp_path):
    a, b = two_ingredients
    before = b.read_bytes()
    with pytest.raises(SystemExit, match=r"is the ingredient .*b\.ckpt"):
        _soup(a, b, out=tmp_path / "soup.ckpt", extra=("--report", str(b)))
    assert b.read_bytes() == before and not (tmp_path / "soup.ckpt").exists()


@pytest.mark.parametrize("existing", ["soup.ckpt", "soup.md"])
def test_soup_never_overwrites_an_existing_file(two_ingredients, tmp_path, existing):
    (tmp_path / existing).write_text("the user's file")
    with pytest.raises(SystemExit, match=rf"{existing} already exists.*never overwrites.*Fix: choose another --out"):
        _soup(*two_ingredients, out=tmp_path / "soup.ckpt")
    assert (tmp_path / existing).read_text() == "the user's file"


def test_soup_of_a_missing_checkpoint_names_it(two_ingredients, tmp_path):
    with pytest.raises(SystemExit, match=r"no checkpoint at .*missing\.ckpt.*Fix: check the path"):
        _soup(two_ingredients[0], tmp_path / "missing.ckpt", out=tmp_path / "soup.ckpt")


def test_soup_of_a_file_that_is_not_a_checkpoint_names_it(two_ingredients, tmp_path):
    (tmp_path / "notes.ckpt").write_text("not a checkpoint")
    with pytest.raises(SystemExit, match=r"cannot read the checkpoint .*notes\.ckpt"):
        _soup(two_ingredients[0], tmp_path / "notes.ckpt", out=tmp_path / "soup.ckpt")


def test_soup_of_one_ingredient_is_refused(two_ingredients, tmp_path):
    with pytest.raises(SystemExit, match=r"one checkpoint .* is no soup.*Fix: pass two or more"):
        _soup(two_ingredients[0], out=tmp_path / "soup.ckpt")
    with pytest.raises(SystemExit, match=r"are the same checkpoint.*Fix: pass each ingredient once"):
        _soup(two_ingredients[0], two_ingredients[0], out=tmp_path / "soup.ckpt")
    assert not (tmp_path / "soup.ckpt").exists()
