"""Continual metrics users expect from Avalanche and Mammoth: forward transfer, class- and
task-incremental accuracy side by side, and the cost of each experience (time, memory, stored bytes)."""

from __future__ import annotations

import json
import math

import lightning as L
import pytest
import torch

from reglab.callbacks import ExperienceReplay
from reglab.continual.costs import state_bytes
from reglab.continual.metrics import forward_transfer, incremental_scores
from reglab.continual.runner import TaskSequenceRunner
from reglab.datamodules import DigitsDataModule, TaskSequenceDataModule
from reglab.tasks import ClassificationModule

TRAINER = dict(accelerator="cpu", devices=1, max_epochs=1, limit_train_batches=2, limit_val_batches=0,
               num_sanity_val_steps=0, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)


def sequence(num_tasks=5, scenario="class") -> TaskSequenceDataModule:
    return TaskSequenceDataModule(DigitsDataModule(flatten=True, batch_size=16), num_tasks=num_tasks, scenario=scenario)


def module() -> ClassificationModule:
    L.seed_everything(0, verbose=False)
    return ClassificationModule("mlp", num_classes=10, input_shape=(64,), backbone_kwargs={"hidden_sizes": (16,)}, lr=1e-2)


# -- the formulas on hand-computed matrices ------------------------------------------------------
def test_forward_transfer_is_the_mean_gain_before_training_over_the_initial_accuracy():
    # tasks 1 and 2: (0.6 − 0.2) and (0.3 − 0.5), mean 0.1; task 0's initial accuracy never enters
    assert forward_transfer(next_task=[0.6, 0.3], initial=[0.9, 0.2, 0.5]) == pytest.approx(0.1)
    assert forward_transfer(next_task=[], initial=[0.4]) == 0.0
    with pytest.raises(ValueError, match="one per task"):
        forward_transfer(next_task=[0.6, 0.3], initial=[0.2, 0.5])


def test_both_rules_are_scored_from_their_own_rows():
    rows = {"class_il": [[0.8], [0.2, 0.9]], "task_il": [[0.9], [0.7, 0.95]]}
    next_task = {"class_il": [0.0], "task_il": [0.6]}
    initial = {"class_il": [0.1, 0.1], "task_il": [0.5, 0.4]}
    scores = incremental_scores(rows, next_task, initial)
    expected = {
        "class_il/average_accuracy": (0.2 + 0.9) / 2, "class_il/forgetting": 0.8 - 0.2,
        "class_il/backward_transfer": 0.2 - 0.8, "class_il/forward_transfer": 0.0 - 0.1,
        "task_il/average_accuracy": (0.7 + 0.95) / 2, "task_il/forgetting": 0.9 - 0.7,
        "task_il/backward_transfer": 0.7 - 0.9, "task_il/forward_transfer": 0.6 - 0.4,
    }
    assert scores == pytest.approx(expected)
    # without the initial accuracies (a run resumed from an older checkpoint) there is no FWT to report
    assert "class_il/forward_transfer" not in incremental_scores(rows, next_task, {"class_il": [], "task_il": []})


def test_state_bytes_counts_every_tensor_a_technique_keeps():
    replay = ExperienceReplay(buffer_size=4)
    replay._store({"input": torch.ones(3, 64), "target": torch.zeros(3, dtype=torch.long)})
    # 4 slots × (64 float32 + one int64) + the int64 count of samples seen
    assert state_bytes(replay) == 4 * (64 * 4 + 8) + 8


# -- the runner: which classes each rule predicts among ---------------------------------------------
def test_each_rule_predicts_among_its_own_candidate_classes(tmp_path):
    """A model whose logits are the constant 0, 1, ..., 9 predicts the largest candidate class, so
    each accuracy is the share of a task's test samples of that one class."""
    data, model = sequence(), module()
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.copy_(torch.arange(10.0))
    runner = TaskSequenceRunner(model, data, (), TRAINER, run_dir=tmp_path, log=False)
    data.setup("fit")
    targets = data.base.test_dataset.targets

    def share(task: int, predicted: int) -> float:
        of_task = targets[torch.isin(targets, torch.tensor(data.tasks[task]))]
        return float((of_task == predicted).float().mean())

    after = 1
    accuracies = runner._accuracies(range(4), after_task=after)
    for task in range(4):
        candidates_class_il = data.classes_seen(max(after, task))
        assert accuracies["class_il"][task] == pytest.approx(share(task, max(candidates_class_il)))
        assert accuracies["task_il"][task] == pytest.approx(share(task, max(data.tasks[task])))
    before = runner._accuracies(range(2), after_task=None)  # before training: the classes of tasks 0..j
    assert before["class_il"] == pytest.approx([share(t, max(data.classes_seen(t))) for t in range(2)])
    assert model.active_classes.all(), "the training mask is restored after testing"


@pytest.mark.parametrize("scenario", ["class", "task"])
def test_the_runner_reports_both_rules_forward_transfer_and_each_experience_cost(tmp_path, scenario):
    replay = ExperienceReplay(buffer_size=8) if scenario == "class" else None
    runner = TaskSequenceRunner(module(), sequence(num_tasks=2, scenario=scenario), [replay] if replay else [],
                                TRAINER, run_dir=tmp_path, log=False)
    matrix = runner.run()
    report = json.loads((tmp_path / "accuracy_matrix.json").read_text())
    rule = "class_il" if scenario == "class" else "task_il"
    assert report["rule"] == rule and report["matrix"] == report["rows"][rule]
    assert [matrix[0, :1].tolist(), matrix[1].tolist()] == report["matrix"]
    for name in ("class_il", "task_il"):
        assert report[f"{name}/forward_transfer"] == pytest.approx(report["next_task"][name][0] - report["initial"][name][1])
    assert report["forward_transfer"] == report[f"{rule}/forward_transfer"]
    # the true class is among a task's own classes, so whatever class-IL gets right task-IL gets right too
    for class_row, task_row in zip(report["rows"]["class_il"], report["rows"]["task_il"]):
        assert all(t >= c for c, t in zip(class_row, task_row))
    assert not any(k.startswith("cost/") for k in report), "the accuracy JSON stays deterministic"

    experiences = json.loads((tmp_path / "experiences.json").read_text())
    assert [e["task"] for e in experiences] == [0, 1]
    assert all(e["fit_s"] > 0 and e["eval_s"] > 0 and e["peak_memory_bytes"] > 0 for e in experiences)
    stored = [sum(e["stored_bytes"].values()) for e in experiences]
    assert stored == ([8 * (64 * 4 + 3 * 8) + 8] * 2 if replay else [0, 0])  # input, target, index, task; count
    scores = runner.scores()
    assert scores["cost/fit_s"] == pytest.approx(sum(e["fit_s"] for e in experiences))
    assert math.isfinite(scores["class_il/average_accuracy"]) and math.isfinite(scores["task_il/average_accuracy"])
    assert "task-incremental" in (tmp_path / "accuracy_matrix.md").read_text()


def test_docstring_examples_run():
    import doctest

    import reglab.continual.costs
    import reglab.continual.metrics

    for module in (reglab.continual.costs, reglab.continual.metrics):
        result = doctest.testmod(module, verbose=False)
        assert result.attempted > 0 and result.failed == 0, module.__name__
