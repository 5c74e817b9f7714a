"""Continual learning: task splits, the task-sequence runner (resume at a boundary and inside a
task), the accuracy-matrix scores and the paper-40 regularizers across real task boundaries."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch

from callbacks import EWC, FeatureDistillation, L2ToPreviousTask, LwF
from callbacks.continual.ewc import diagonal_fisher
from callbacks.continual.lwf import prediction_distillation
from datamodules import DigitsDataModule, TaskSequenceDataModule, split_classes
from lightning_app.continual.metrics import accuracy_matrix, average_accuracy, backward_transfer, forgetting
from lightning_app.continual.runner import TaskSequenceRunner
from lightning_app.tasks import ClassificationModule

FAST_TRAINER = dict(
    accelerator="cpu", devices=1, max_epochs=1, enable_progress_bar=False, enable_model_summary=False,
    num_sanity_val_steps=0, limit_val_batches=0,
)


def split_digits(num_tasks=5, **kwargs) -> TaskSequenceDataModule:
    return TaskSequenceDataModule(DigitsDataModule(flatten=True, batch_size=64), num_tasks=num_tasks, **kwargs)


def small_module() -> ClassificationModule:
    L.seed_everything(0, verbose=False)
    return ClassificationModule("mlp", num_classes=10, input_shape=(64,), backbone_kwargs={"hidden_sizes": (32,)}, lr=1e-2)


# -- data ---------------------------------------------------------------------------------------
def test_class_incremental_split_covers_every_class_once_and_tags_the_task():
    data = split_digits()
    data.setup("fit")
    assert sorted(c for group in data.tasks for c in group) == list(range(10))
    assert data.class_order != list(range(10)), "the class order is a seeded permutation"
    for task in range(5):
        data.set_task(task)
        targets = torch.cat([batch["target"] for batch in data.train_dataloader()])
        assert set(targets.tolist()) == set(data.tasks[task])
        batch = next(iter(data.train_dataloader()))
        assert (batch["task"] == task).all() and batch["index"].max() < data.num_train_samples
    assert data.num_train_samples == data.base.num_train_samples


def test_few_shot_sessions_keep_k_shots_per_new_class():
    data = split_digits(num_tasks=3, first_task_classes=6, shots=5)
    data.setup("fit")
    assert [len(group) for group in data.tasks] == [6, 2, 2]
    assert len(data.task_split("train", 0)) > 500
    for session in (1, 2):
        targets = data.base.train_dataset.targets[data.task_split("train", session).positions]
        assert sorted(targets.tolist()) == sorted(data.tasks[session] * 5)


def test_split_classes_rejects_uneven_splits():
    with pytest.raises(ValueError, match="do not split evenly"):
        split_classes(list(range(10)), 3)


# -- metrics ------------------------------------------------------------------------------------
def test_scores_follow_their_definitions():
    matrix = accuracy_matrix([[0.9], [0.7, 0.8], [0.6, 0.75, 0.95]])
    assert math.isclose(average_accuracy(matrix), (0.6 + 0.75 + 0.95) / 3)
    assert math.isclose(forgetting(matrix), ((0.9 - 0.6) + (0.8 - 0.75)) / 2)  # max - last
    assert math.isclose(backward_transfer(matrix), ((0.6 - 0.9) + (0.75 - 0.8)) / 2)


# -- techniques' cores --------------------------------------------------------------------------
def test_prediction_distillation_is_zero_for_identical_logits_and_positive_otherwise():
    logits = torch.randn(4, 3)
    assert float(prediction_distillation(logits, logits, 2.0)) == pytest.approx(0.0, abs=1e-6)
    assert float(prediction_distillation(logits, logits.flip(-1), 2.0)) > 0


def test_fisher_is_nonnegative_and_leaves_batch_norm_statistics_alone():
    module = ClassificationModule("cnn", num_classes=10, input_shape=(1, 8, 8))
    before = {k: v.clone() for k, v in module.state_dict().items()}
    fisher = diagonal_fisher(module, [{"input": torch.rand(6, 1, 8, 8), "target": torch.zeros(6, dtype=torch.long)}])
    assert all((f >= 0).all() for f in fisher.values()) and any(f.sum() > 0 for f in fisher.values())
    for key, value in module.state_dict().items():
        assert torch.equal(value, before[key]), key


# -- the runner ---------------------------------------------------------------------------------
def _sequence(tmp_path, ckpt_path=None, every=None):
    module = small_module()
    techniques = [L2ToPreviousTask(lam=0.5), EWC(lam=50.0, fisher_samples=64), LwF()]
    runner = TaskSequenceRunner(module, split_digits(num_tasks=3, first_task_classes=4), techniques,
                                FAST_TRAINER, run_dir=tmp_path, checkpoint_every_n_steps=every, log=False)
    matrix = runner.run(ckpt_path=ckpt_path)
    return module, techniques, matrix


def _assert_same(a, b):
    (module_a, techniques_a, matrix_a), (module_b, techniques_b, matrix_b) = a, b
    for key, value in module_a.state_dict().items():
        torch.testing.assert_close(module_b.state_dict()[key], value, rtol=0, atol=0, msg=key)
    for ta, tb in zip(techniques_a, techniques_b):
        state_a, state_b = ta.state_dict(), tb.state_dict()
        assert state_a.keys() == state_b.keys() and state_a
        for key, value in state_a.items():
            torch.testing.assert_close(state_b[key], value, rtol=0, atol=0, msg=key)
    torch.testing.assert_close(matrix_b, matrix_a, equal_nan=True, rtol=0, atol=0)


@pytest.mark.slow
def test_resume_at_a_boundary_and_inside_a_task_equals_the_uninterrupted_sequence(tmp_path):
    straight = _sequence(tmp_path / "straight", every=3)
    checkpoints = tmp_path / "straight" / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("task_*_end.ckpt")) == [f"task_{t}_end.ckpt" for t in range(3)]
    matrix = straight[2]
    assert matrix.shape == (3, 3) and torch.isnan(matrix[0, 1]) and (matrix.diagonal() > 0.5).all()
    assert (tmp_path / "straight" / "accuracy_matrix.png").is_file()

    at_boundary = _sequence(tmp_path / "boundary", ckpt_path=checkpoints / "task_0_end.ckpt")
    _assert_same(straight, at_boundary)
    mid_task = checkpoints / "task_1" / "epoch=0-step=3.ckpt"
    assert mid_task.is_file(), sorted(p.name for p in (checkpoints / "task_1").iterdir())
    inside = _sequence(tmp_path / "inside", ckpt_path=mid_task)
    _assert_same(straight, inside)


def test_class_incremental_training_masks_unseen_classes(tmp_path):
    module, data = small_module(), split_digits(num_tasks=5)
    runner = TaskSequenceRunner(module, data, (), {**FAST_TRAINER, "max_epochs": 1, "enable_checkpointing": False},
                                run_dir=tmp_path, log=False)
    data.setup("fit")
    runner._show_task(1)
    assert module.active_classes.nonzero().flatten().tolist() == sorted(data.classes_seen(1))
    logits = module.forward_step({"input": torch.rand(2, 64), "target": torch.zeros(2, dtype=torch.long)}).logits
    unseen = ~module.active_classes
    assert torch.isinf(logits[:, unseen]).all() and torch.isfinite(logits[:, ~unseen]).all()
