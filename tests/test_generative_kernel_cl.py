"""Kernel continual learning and its generative variant (paper 09): the kernel ridge and random
feature maths, the generator (probabilistic PCA, replay of its own samples) and the supervised
contrast on hand-computed cases; through the task runner: the classifier's scores, the coreset set
aside, the memory in bytes, exact resume at a task boundary."""

from __future__ import annotations

import doctest
import importlib
import math

import lightning as L
import pytest
import torch

from reglab.callbacks import GenerativeKernelCL, KernelContinualLearning
from reglab.callbacks.continual.generative_kernel_cl import fit_ppca, sample_residuals, supervised_contrast
from reglab.callbacks.continual.kernel_continual_learning import (balanced_draw, kernel_ridge_predict, linear_kernel,
                                                                  median_bandwidth, one_hot_among, random_fourier_features,
                                                                  rbf_kernel)
from reglab.continual.runner import TaskSequenceRunner
from reglab.datamodules import DigitsDataModule, TaskSequenceDataModule
from reglab.tasks import ClassificationModule
from reglab.technique import TechniqueConfigError

TASK_TRAINER = dict(accelerator="cpu", devices=1, max_epochs=1, limit_train_batches=2, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)


@pytest.mark.parametrize("module", ["kernel_continual_learning", "generative_kernel_cl"])
def test_docstring_examples(module):
    found = doctest.testmod(importlib.import_module(f"reglab.callbacks.continual.{module}"))
    assert found.attempted and not found.failed


# -- the kernel maths ----------------------------------------------------------------------------------
def test_kernel_ridge_regression_of_a_two_point_support_by_hand():
    """K = [[2, 1], [1, 2]], ridge 1: (K + I)^-1 = [[3, -1], [-1, 3]] / 8; with Y = I the query whose
    kernel row is [1, 0] scores [3/8, -1/8]."""
    scores = kernel_ridge_predict(torch.tensor([[2.0, 1.0], [1.0, 2.0]]), torch.tensor([[1.0, 0.0]]), torch.eye(2), ridge=1.0)
    torch.testing.assert_close(scores, torch.tensor([[3 / 8, -1 / 8]]))


def test_rbf_kernel_and_random_fourier_features_by_hand():
    a, b = torch.tensor([[0.0, 0.0]]), torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    torch.testing.assert_close(rbf_kernel(a, b, bandwidth=5.0), torch.tensor([[math.exp(-0.5), 1.0]]))
    # one basis (1, 0), phase 0, bandwidth 2: sqrt(2) cos(x_0 / 2)
    phi = random_fourier_features(torch.tensor([[math.pi, 7.0], [0.0, 7.0]]), torch.tensor([[1.0, 0.0]]), torch.zeros(1), 2.0)
    torch.testing.assert_close(phi, torch.tensor([[0.0], [math.sqrt(2)]]), atol=1e-6, rtol=0)
    assert linear_kernel(a, b).abs().sum() == 0


def test_random_fourier_features_approximate_the_gaussian_kernel():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, generator=generator)
    bases, bias = torch.randn(20000, 3, generator=generator), torch.rand(20000, generator=generator) * 2 * math.pi
    phi = random_fourier_features(x, bases, bias, bandwidth=1.5)
    torch.testing.assert_close(phi @ phi.T, rbf_kernel(x, x, 1.5), atol=0.03, rtol=0)


def test_median_bandwidth_one_hot_and_balanced_draw():
    torch.testing.assert_close(median_bandwidth(torch.tensor([[0.0], [1.0], [3.0], [7.0]])), torch.tensor(3.0))  # 1,3,7,2,6,4
    torch.testing.assert_close(one_hot_among(torch.tensor([4, 2]), torch.tensor([2, 4, 9])), torch.tensor([[0., 1., 0.], [1., 0., 0.]]))
    targets = torch.tensor([0, 1, 1, 0, 1, 0, 1])
    drawn = balanced_draw(targets, torch.tensor([0, 1]), 2, torch.Generator().manual_seed(0))
    assert targets[drawn].bincount().tolist() == [2, 2] and len(set(drawn.tolist())) == 4


# -- the generator ---------------------------------------------------------------------------------------
def test_ppca_keeps_the_top_directions_and_averages_the_rest_into_the_noise():
    """Residuals with covariance diag(4, 1, 0.25) (by construction): rank 1 gives W = sqrt(4 - s2) e0 with
    s2 = (1 + 0.25) / 2, and the model covariance W W^T + s2 I has the data's variance along e0."""
    residuals = torch.tensor([[2.0, 0, 0], [-2.0, 0, 0], [0, 1.0, 0], [0, -1.0, 0], [0, 0, 0.5], [0, 0, -0.5]]) * math.sqrt(3)
    basis, noise = fit_ppca(residuals, rank=1)   # covariance: diag(12, 3, 0.75) / 3 = diag(4, 1, 0.25)
    torch.testing.assert_close(noise, torch.tensor(0.625))
    torch.testing.assert_close(basis.abs().flatten(), torch.tensor([math.sqrt(4 - 0.625), 0.0, 0.0]))
    drawn = sample_residuals(basis, noise, 40000, torch.Generator().manual_seed(0))
    torch.testing.assert_close(drawn.T @ drawn / len(drawn), torch.diag(torch.tensor([4.0, 0.625, 0.625])), atol=0.08, rtol=0)


def _generator_after_two_tasks(replay: bool) -> dict[str, torch.Tensor]:
    """Task 0 (classes 0, 1) varies only along e0, task 1 (classes 2, 3) only along e1."""
    gkcl = GenerativeKernelCL(rank=2, support_per_class=2)
    gkcl.class_task = torch.zeros(4, dtype=torch.long)
    offsets = torch.tensor([1.0, -1.0]).repeat(500)
    for task, axis in ((0, 0), (1, 1)):
        classes = torch.tensor([2 * task, 2 * task + 1])
        inputs = torch.zeros(1000, 3)
        inputs[:, axis] = 3.0 * offsets
        inputs[:, 2] = 10.0 * classes.repeat_interleave(500)  # class means apart along e2
        gkcl.class_task[classes] = task + 1
        if not replay:
            gkcl.class_task[: 2 * task] = 0  # the earlier classes are forgotten: nothing to replay
        gkcl.remember_task({"input": inputs, "target": classes.repeat_interleave(500), "index": torch.arange(1000)}, classes, task)
    return gkcl.generator


def test_replay_on_the_generator_keeps_the_earlier_tasks_variance():
    """Without replay the refit on task 1 sees variance 9 along e1 only; with replay it sees task 0's
    generated residuals too (variance 9 along e0, as many samples), so each axis holds 9 / 2 (within
    three standard errors of the 1000 replayed draws' variance)."""
    def variance(generator, axis):
        covariance = generator["basis"] @ generator["basis"].T + generator["noise"] * torch.eye(3)
        return float(covariance[axis, axis])

    forgotten, replayed = _generator_after_two_tasks(replay=False), _generator_after_two_tasks(replay=True)
    assert variance(forgotten, 0) == pytest.approx(0.0, abs=1e-4) and variance(forgotten, 1) == pytest.approx(9.0, rel=1e-4)
    assert variance(replayed, 0) == pytest.approx(4.5, rel=0.15) and variance(replayed, 1) == pytest.approx(4.5, rel=0.15)
    torch.testing.assert_close(replayed["means"][:, 2], torch.tensor([0.0, 10.0, 20.0, 30.0]))


def test_supervised_contrast_by_hand():
    """Rows e0, e0 (class 0) and e1 (class 1), temperature 1: each class-0 anchor has log p =
    1 - log(e + 1); the class-1 anchor has no positive and takes no part."""
    loss = supervised_contrast(torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 0, 1]), temperature=1.0)
    torch.testing.assert_close(loss, torch.tensor(math.log(math.e + 1) - 1))


# -- through the task runner -------------------------------------------------------------------------------
def _split(scenario="task"):
    return TaskSequenceDataModule(DigitsDataModule(flatten=True, batch_size=32, seed=0), num_tasks=2, scenario=scenario)


def _module():
    L.seed_everything(0, verbose=False)
    return ClassificationModule("mlp", num_classes=10, input_shape=(64,), backbone_kwargs={"hidden_sizes": (16,)})


def _run(technique, tmp_path, ckpt_path=None):
    module = _module()
    runner = TaskSequenceRunner(module, _split(), [technique], TASK_TRAINER, run_dir=tmp_path, log=False)
    runner.run(ckpt_path=ckpt_path)
    return module, runner


def test_kernel_cl_scores_each_task_from_its_coreset_and_stores_exactly_the_coresets(tmp_path):
    kcl = KernelContinualLearning(core_size=10, kernel="linear")  # 2 tasks of 5 classes: 2 per class
    module, runner = _run(kcl, tmp_path)
    data = runner.datamodule
    # memory: 10 inputs of 64 float32 and 10 int64 labels per task, and the class -> task table (10 int64)
    assert runner.progress.experiences[-1]["stored_bytes"] == {"kernel_continual_learning": 2 * 10 * (64 * 4 + 8) + 10 * 8}
    module.eval()
    module.active_classes.fill_(True)  # as the runner's evaluation: every class live, each rule masks itself
    batch = next(iter(data.task_dataloader("test", 0)))
    with torch.no_grad():
        logits = module.forward_step(batch).logits
        classes = torch.tensor(data.tasks[0])
        support, targets = kcl.coresets["0.input"], kcl.coresets["0.target"]
        expected = kernel_ridge_predict(linear_kernel(module.backbone(support), module.backbone(support)),
                                        linear_kernel(module.backbone(batch["input"]), module.backbone(support)),
                                        one_hot_among(targets, classes), ridge=0.1)
    torch.testing.assert_close(logits[:, classes], expected)
    assert set(targets.tolist()) == set(classes.tolist()) and targets.bincount()[classes].tolist() == [2] * 5
    for other in (1, 0):  # the columns of every other task come from that task's classifier, none are left at 0
        assert logits[:, torch.tensor(data.tasks[other])].abs().sum() > 0


def test_a_module_loaded_from_a_boundary_checkpoint_gets_its_kernel_classifier_back(tmp_path):
    kcl = KernelContinualLearning(core_size=10, kernel="rff", num_random_features=32)
    module, runner = _run(kcl, tmp_path)
    loaded = ClassificationModule.load_from_checkpoint(tmp_path / "checkpoints" / "task_1_end.ckpt")
    batch = next(iter(runner.datamodule.task_dataloader("test", 0)))
    for m in (module, loaded):
        m.eval()
        m.active_classes.fill_(True)
    with torch.no_grad():
        torch.testing.assert_close(loaded.forward_step(batch).logits, module.forward_step(batch).logits)
    restored = loaded._reglab_kernel_classifier
    assert restored is not kcl and restored.kernel == "rff" and restored.coresets.keys() == kcl.coresets.keys()


def test_the_current_tasks_coreset_is_not_trained_on():
    kcl = KernelContinualLearning(core_size=4)
    kcl.set_aside = torch.tensor([3, 8])
    batch = {"input": torch.zeros(4, 2), "target": torch.tensor([0, 1, 0, 1]), "index": torch.tensor([1, 3, 5, 8]), "name": "x"}
    kept = kcl.transform_batch(batch, module=None)
    assert kept["index"].tolist() == [1, 5] and kept["target"].tolist() == [0, 0] and kept["name"] == "x"


def test_generative_kernel_cl_stores_only_its_generator_and_resumes_exactly_at_a_boundary(tmp_path):
    straight_gkcl, resumed_gkcl = GenerativeKernelCL(support_per_class=3, rank=2), GenerativeKernelCL(support_per_class=3, rank=2)
    straight_module, straight = _run(straight_gkcl, tmp_path / "straight")
    # means of 10 classes x 64, a 64 x 2 basis, the noise variance, the class -> task table
    assert straight.progress.experiences[-1]["stored_bytes"] == {"generative_kernel_cl": (10 * 64 + 64 * 2 + 1) * 4 + 10 * 8}
    resumed_module, resumed = _run(resumed_gkcl, tmp_path / "resumed",
                                   ckpt_path=tmp_path / "straight" / "checkpoints" / "task_0_end.ckpt")
    for key, value in straight_module.state_dict().items():
        torch.testing.assert_close(resumed_module.state_dict()[key], value, rtol=0, atol=0, msg=key)
    torch.testing.assert_close(resumed.matrix, straight.matrix, equal_nan=True, rtol=0, atol=0)
    straight_state, resumed_state = straight_gkcl.state_dict(), resumed_gkcl.state_dict()
    assert straight_state.keys() == resumed_state.keys()
    for key, value in straight_state.items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(resumed_state[key], value, rtol=0, atol=0, msg=key)


def test_a_class_incremental_sequence_is_refused(tmp_path):
    runner = TaskSequenceRunner(_module(), _split("class"), [KernelContinualLearning()], TASK_TRAINER, run_dir=tmp_path, log=False)
    with pytest.raises(TechniqueConfigError, match="scenario='task'"):
        runner.run()
