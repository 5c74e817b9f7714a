"""Continual learning: task splits, the task-sequence runner (resume at a boundary and inside a
task), the accuracy-matrix scores and the paper-40 regularizers across real task boundaries."""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning as L
import pytest
import torch

from harness import ddp_strategy
from reglab.callbacks import EWC, SI, ExperienceReplay, FeatureDistillation, L2ToPreviousTask, LwF
from reglab.callbacks.continual.ewc import diagonal_fisher
from reglab.callbacks.continual.lwf import prediction_distillation
from reglab.callbacks.continual.experience_replay import reservoir_slots
from reglab.datamodules import DigitsDataModule, TaskSequenceDataModule, split_classes
from reglab.continual.cli import main as fit_tasks
from reglab.continual.metrics import accuracy_matrix, average_accuracy, backward_transfer, forgetting
from reglab.continual.runner import TaskSequenceRunner, latest_checkpoint
from reglab.tasks import ClassificationModule

REPO = Path(__file__).resolve().parents[1]

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
TECHNIQUE_SETS = {
    "rehearsal-free": lambda: [L2ToPreviousTask(lam=0.5), EWC(lam=50.0, fisher_samples=64), LwF()],
    "baselines": lambda: [SI(c=1.0), ExperienceReplay(buffer_size=32)],
}


def _sequence(tmp_path, ckpt_path=None, every=None, techniques="rehearsal-free"):
    module = small_module()
    techniques = TECHNIQUE_SETS[techniques]()
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
@pytest.mark.parametrize("techniques", sorted(TECHNIQUE_SETS))
def test_resume_at_a_boundary_and_inside_a_task_equals_the_uninterrupted_sequence(tmp_path, techniques):
    straight = _sequence(tmp_path / "straight", every=3, techniques=techniques)
    checkpoints = tmp_path / "straight" / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("task_*_end.ckpt")) == [f"task_{t}_end.ckpt" for t in range(3)]
    matrix = straight[2]
    assert matrix.shape == (3, 3) and torch.isnan(matrix[0, 1]) and (matrix.diagonal() > 0.5).all()
    assert (tmp_path / "straight" / "accuracy_matrix.png").is_file()

    at_boundary = _sequence(tmp_path / "boundary", ckpt_path=checkpoints / "task_0_end.ckpt", techniques=techniques)
    _assert_same(straight, at_boundary)
    mid_task = checkpoints / "task_1" / "epoch=0-step=3.ckpt"
    assert mid_task.is_file(), sorted(p.name for p in (checkpoints / "task_1").iterdir())
    inside = _sequence(tmp_path / "inside", ckpt_path=mid_task, techniques=techniques)
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


# -- joint training and the pretraining split ---------------------------------------------------
def test_joint_training_shows_every_seen_task_with_its_own_task_tag():
    data = split_digits(num_tasks=5, joint=True)
    data.setup("fit")
    data.set_task(2)
    batches = list(data.train_dataloader())
    targets, tasks = torch.cat([b["target"] for b in batches]), torch.cat([b["task"] for b in batches])
    assert set(targets.tolist()) == set(data.classes_seen(2))
    for task in range(3):
        assert set(targets[tasks == task].tolist()) == set(data.tasks[task])
    assert len(targets) == sum(len(data.task_split("train", t)) for t in range(3))
    assert set(torch.cat([b["target"] for b in data.task_dataloader("test", 1)]).tolist()) == set(data.tasks[1])
    with pytest.raises(ValueError, match="scenario='class'"):
        split_digits(joint=True, scenario="task")


def test_pretraining_images_are_set_aside_from_every_task():
    sequence = split_digits(pretrain_fraction=0.5)
    sequence.setup("fit")
    in_tasks = torch.cat([sequence.task_split("train", t).positions for t in range(5)])
    pretraining = split_digits(pretrain_fraction=0.5, pretraining=True)
    pretraining.setup("fit")
    set_aside = pretraining.train_dataset.positions
    assert not set(in_tasks.tolist()) & set(set_aside.tolist())
    assert len(in_tasks) + len(set_aside) == sequence.num_train_samples
    assert set(pretraining.base.train_dataset.targets[set_aside].tolist()) == set(range(10))
    assert len(pretraining.test_dataset) == len(pretraining.base.test_dataset)
    with pytest.raises(ValueError, match="pretrain_fraction"):
        split_digits(pretraining=True)


# -- SI: the path integral by hand ----------------------------------------------------------------
def _sgd_path(si, parameter, gradients, lr=0.1):
    """Take SGD steps with the given loss gradients through SI's hooks (the gradient the optimizer
    sees includes SI's own penalty, as in training)."""
    module = torch.nn.Module()
    module.theta = parameter
    for grad in gradients:
        penalty_grad = 0.0
        if si.anchor:
            penalty_grad = 2 * si.lam * si.importance["theta"] * (parameter.detach() - si.anchor["theta"])
        parameter.grad = grad + penalty_grad
        si.on_before_optimizer_step(None, module, None)
        with torch.no_grad():
            parameter -= lr * parameter.grad
        si.on_train_batch_end(None, module, None, None, 0)
    return module


def test_si_accumulates_minus_gradient_times_step_and_normalises_by_the_squared_move():
    theta = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    si = SI(c=0.5, xi=0.1)
    grads = [torch.tensor([0.5, -1.0]), torch.tensor([0.25, 2.0])]
    module = _sgd_path(si, theta, grads)
    # step 1: theta 1.0, -2.0 -> 0.95, -1.9 ; step 2: -> 0.925, -2.1
    omega = -(grads[0] * torch.tensor([-0.05, 0.1]) + grads[1] * torch.tensor([-0.025, -0.2]))
    torch.testing.assert_close(si.omega["theta"], omega)
    si.remember(module)
    delta = torch.tensor([0.925 - 1.0, -2.1 + 2.0])
    torch.testing.assert_close(si.importance["theta"], omega / (delta**2 + 0.1))
    assert not si.omega and torch.equal(si.anchor["theta"], theta.detach())

    # on the next task the path integral uses the loss gradient without SI's own pull
    first_importance = si.importance["theta"].clone()
    with torch.no_grad():
        theta += 0.3  # away from the anchor, so the pull is not zero
    task_grad = torch.tensor([1.0, 1.0])
    _sgd_path(si, theta, [task_grad])
    moved = -0.1 * (task_grad + 2 * 0.5 * first_importance * 0.3)
    torch.testing.assert_close(si.omega["theta"], -task_grad * moved)


# -- experience replay ----------------------------------------------------------------------------
def test_reservoir_keeps_each_sample_with_probability_size_over_seen():
    kept = torch.zeros(100)
    for trial in range(300):
        generator, slots = torch.Generator().manual_seed(trial), {}
        for start in range(0, 100, 10):
            for slot, position in reservoir_slots(start, 10, 20, generator).items():
                slots[slot] = start + position
        kept[list(slots.values())] += 1
    rate = kept / 300
    assert len(slots) == 20
    # every sample is kept with probability 20/100; early and late ones alike
    assert abs(rate[:50].mean() - 0.2) < 0.03 and abs(rate[50:].mean() - 0.2) < 0.03


def test_replay_mixes_earlier_samples_into_the_batch_and_saves_its_buffer():
    replay, module = ExperienceReplay(buffer_size=8, replay_batch_size=3), small_module()
    first = {"input": torch.rand(4, 64), "target": torch.tensor([0, 1, 0, 1]), "index": torch.arange(4)}
    assert replay.transform_batch(first, module)["input"].shape[0] == 4  # empty buffer: nothing to replay
    second = {"input": torch.rand(4, 64), "target": torch.tensor([2, 3, 2, 3]), "index": torch.arange(4, 8)}
    mixed = replay.transform_batch(second, module)
    assert mixed["input"].shape == (7, 64) and set(mixed["index"][4:].tolist()) <= {0, 1, 2, 3}
    torch.testing.assert_close(mixed["input"][4:], first["input"][mixed["index"][4:]])
    restored = ExperienceReplay(buffer_size=8, replay_batch_size=3)
    restored.load_state_dict(replay.state_dict())
    third = {"input": torch.rand(4, 64), "target": torch.tensor([4, 5, 4, 5]), "index": torch.arange(8, 12)}
    expected, resumed = replay.transform_batch(third, module), restored.transform_batch(third, module)
    for key, value in expected.items():
        torch.testing.assert_close(resumed[key], value)
    with pytest.raises(ValueError, match="buffer_size"):
        ExperienceReplay(buffer_size=0)
    task_incremental = L.Trainer(logger=False)
    task_incremental.datamodule = split_digits(scenario="task")
    with pytest.raises(ValueError, match="scenario='class'"):
        replay.on_task_start(task_incremental, module, 0)


# -- EWC under DDP ------------------------------------------------------------------------------
def _fisher_batches(rank=None):
    generator = torch.Generator().manual_seed(5)
    inputs, targets = torch.rand(8, 64, generator=generator), torch.randint(0, 10, (8,), generator=generator)
    shards = {0: slice(0, 5), 1: slice(5, 8)}  # unequal shards: the mean of the two means would differ
    parts = [shards[rank]] if rank is not None else [slice(0, 8)]
    return [{"input": inputs[s], "target": targets[s]} for s in parts]


class FisherOnEachRank(L.Callback):
    def __init__(self, report_dir):
        self.report_dir = report_dir

    def on_train_end(self, trainer, pl_module):
        ewc = EWC(lam=1.0).remember(pl_module, _fisher_batches(trainer.global_rank))
        torch.save({"fisher": ewc.importance, "weights": pl_module.state_dict()},
                   self.report_dir / f"rank{trainer.global_rank}.pt")


@pytest.mark.slow
def test_ewc_fisher_under_ddp_equals_the_single_process_fisher_of_all_shards(tmp_path):
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=ddp_strategy(), max_steps=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0, callbacks=[FisherOnEachRank(tmp_path)])
    trainer.fit(small_module(), datamodule=DigitsDataModule(flatten=True, batch_size=64))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    module = small_module()
    module.load_state_dict(ranks[0]["weights"])
    single = diagonal_fisher(module, _fisher_batches())
    for name, value in single.items():
        assert value.abs().sum() > 0
        for report in ranks:
            torch.testing.assert_close(report["fisher"][name], value, rtol=1e-5, atol=1e-8, msg=name)


# -- the command: TensorBoard beside CSV, --ckpt_path last ---------------------------------------------
@pytest.mark.slow
def test_fit_tasks_logs_tensorboard_and_resumes_the_newest_checkpoint_with_last(tmp_path):
    args = ["--config", str(REPO / "configs/experiment/split_digits.yaml"), f"--runs_dir={tmp_path}",
            "--data.init_args.num_tasks=2", "--trainer.max_epochs=1", "--checkpoint_every_n_steps=4"]
    fit_tasks(args)
    run = tmp_path / "split_digits" / "version_0"
    for task in range(2):
        logs = run / "tasks" / f"task_{task}"
        assert (logs / "metrics.csv").is_file() and list(logs.glob("events.out.tfevents.*")), sorted(logs.iterdir())
    checkpoints = run / "checkpoints"
    assert latest_checkpoint(run) == checkpoints / "task_1_end.ckpt"
    finished = json.loads((run / "accuracy_matrix.json").read_text())

    # interrupted inside task 1: the newest checkpoint is task 1's latest step
    (checkpoints / "task_1_end.ckpt").unlink()
    (checkpoints / "task_1" / "last.ckpt").unlink(missing_ok=True)
    (run / "accuracy_matrix.json").unlink()
    newest = latest_checkpoint(run)
    assert newest.parent.name == "task_1" and newest.name == max(
        (p.name for p in (checkpoints / "task_1").glob("*.ckpt")), key=lambda n: int(n.split("step=")[1][:-5]))
    fit_tasks([*args, "--ckpt_path", "last"])
    assert not (tmp_path / "split_digits" / "version_1" / "checkpoints").exists(), "resumed in a new folder"
    assert json.loads((run / "accuracy_matrix.json").read_text()) == finished
    assert latest_checkpoint(run) == checkpoints / "task_1_end.ckpt"


def test_pretrained_weights_are_copied_in_before_the_first_task_only(tmp_path):
    from reglab.callbacks.fine_tuning import PretrainedWeights

    runner = TaskSequenceRunner(small_module(), split_digits(num_tasks=2), (), FAST_TRAINER,
                                callbacks=[PretrainedWeights(checkpoint="pretrained.ckpt")], run_dir=tmp_path, log=False)
    starts = [[cb for cb in runner._trainer_for(task).callbacks if isinstance(cb, PretrainedWeights)] for task in (0, 1)]
    assert [len(found) for found in starts] == [1, 0]
