"""OVOR (paper 08): outlier synthesis and the energy-margin loss; TEEN (paper 47): the calibration
formula and its few-shot sessions in the task runner (training-free, exact boundary resume)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from reglab.callbacks import OVOR, TEEN
from reglab.callbacks.continual.ovor import energy_margin_loss, kth_neighbour_distance, synthesize_outliers
from reglab.callbacks.continual.teen import calibrate_prototypes, class_means
from reglab.datamodules import DigitsDataModule, TaskSequenceDataModule
from reglab.continual.runner import TaskSequenceRunner
from reglab.mixins import StepOutput
from reglab.tasks import ClassificationModule
from reglab.technique import TechniqueConfigError


def two_blobs(n: int = 60, dim: int = 6, seed: int = 0) -> torch.Tensor:
    """Two Gaussian blobs of ID features, both far from the origin (like post-ReLU features)."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.zeros(2, dim)
    centres[0, :3], centres[1, 3:] = 5.0, 5.0
    return torch.cat([c + torch.randn(n, dim, generator=generator) for c in centres])


TASK_TRAINER = dict(accelerator="cpu", devices=1, max_epochs=1, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
SMALL = dict(k=5, boundary_points=8, candidates_per_point=100, outliers_per_class=10, std=0.5)


# -- OVOR ---------------------------------------------------------------------------------------
def test_outliers_have_the_asked_shape_and_are_deterministic_under_a_seed():
    features = two_blobs()
    draw = lambda seed: synthesize_outliers(features, 2, generator=torch.Generator().manual_seed(seed), **SMALL)
    first, again, other = draw(0), draw(0), draw(1)
    assert first.shape == (2 * SMALL["outliers_per_class"], features.shape[1])
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_outliers_lie_farther_from_the_id_features_than_id_points_from_each_other():
    features = two_blobs()
    outliers = synthesize_outliers(features, 2, generator=torch.Generator().manual_seed(0), **SMALL)
    reference = F.normalize(features, dim=1)
    id_spread = kth_neighbour_distance(reference, reference, SMALL["k"])
    outlier_distance = kth_neighbour_distance(F.normalize(outliers, dim=1), reference, SMALL["k"])
    assert outlier_distance.min() > id_spread.median()
    assert outlier_distance.mean() > id_spread.max()


def test_outliers_are_drawn_around_boundary_points_not_around_the_origin():
    """The official code drops the boundary points (candidates = noise around 0); here every
    outlier is one Gaussian draw away from an ID feature."""
    features = two_blobs()
    outliers = synthesize_outliers(features, 2, generator=torch.Generator().manual_seed(0), **SMALL)
    nearest_id = torch.cdist(outliers, features).min(dim=1).values
    draw_radius = SMALL["std"] * math.sqrt(features.shape[1])
    assert nearest_id.max() < 3 * draw_radius < features.norm(dim=1).min()


def test_energy_margin_loss_matches_a_hand_computation():
    # E_id = -log 2, gap to tau_id = -15 is 15 - log 2 > 1: Huber's linear part, gap - 1/2.
    # E_ood = -(3 + log 2), gap to tau_ood = -3 is log 2 < 1: Huber's quadratic part, gap^2 / 2.
    id_logits, ood_logits = torch.zeros(1, 2), torch.full((1, 2), 3.0)
    expected = (15 - math.log(2) - 0.5) + 0.5 * math.log(2) ** 2
    loss = energy_margin_loss(id_logits, ood_logits, tau_id=-15.0, tau_ood=-3.0)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    # Inside both margins the loss is zero.
    assert energy_margin_loss(torch.full((1, 2), 20.0), torch.full((1, 2), -5.0), -15.0, -3.0).item() == 0.0


def test_ovor_term_uses_only_the_current_tasks_classes():
    module = ClassificationModule("mlp", num_classes=4, input_shape=(3,), backbone_kwargs={"hidden_sizes": (5,)})
    ovor = OVOR(lam=0.1)
    ovor.current_classes, ovor.outliers = torch.tensor([2, 3]), torch.rand(6, 5)
    features = torch.rand(4, 5)
    logits = module.head(features)
    logits[:, :2] = float("-inf")  # old classes masked: must not reach the energy
    out = StepOutput(logits=logits, target=torch.tensor([2, 3, 2, 3]), features=features)
    term = ovor.loss_terms(out, module)["energy"]
    expected = 0.1 * energy_margin_loss(logits[:, 2:], module.head(ovor.outliers)[:, 2:], -15.0, -3.0)
    assert torch.isfinite(term) and torch.allclose(term, expected)


def test_ovor_in_a_task_sequence_regularizes_each_task_with_its_own_outliers(tmp_path):
    L.seed_everything(0, verbose=False)
    data = TaskSequenceDataModule(DigitsDataModule(flatten=True, batch_size=64), num_tasks=2)
    module = ClassificationModule("mlp", num_classes=10, input_shape=(64,), backbone_kwargs={"hidden_sizes": (16,)})
    ovor = OVOR(k=5, boundary_points=4, candidates_per_point=20, outliers_per_class=3)
    seen = []
    probe = L.Callback()
    probe.on_train_end = lambda trainer, pl_module: seen.append((ovor.task, ovor.current_classes.tolist(), ovor.outliers.clone()))
    TaskSequenceRunner(module, data, [ovor], TASK_TRAINER, callbacks=[probe], run_dir=tmp_path, log=False).run()
    assert [(task, classes) for task, classes, _ in seen] == [(0, data.tasks[0]), (1, data.tasks[1])]
    first, second = seen[0][2], seen[1][2]
    assert first.shape == second.shape == (3 * 5, 16) and not torch.equal(first, second)


def test_ovor_refuses_bad_arguments_and_a_module_without_a_head():
    with pytest.raises(TechniqueConfigError, match="OVOR: tau_id"):
        OVOR(tau_id=-3.0, tau_ood=-15.0)
    with pytest.raises(TechniqueConfigError, match="k must be at least 1"):
        OVOR(k=0)
    module = ClassificationModule("mlp", num_classes=4, input_shape=(3,))
    module.head = None
    trainer = SimpleNamespace(callbacks=[], datamodule=SimpleNamespace(train_dataset=[], batch_keys=None))
    with pytest.raises(TechniqueConfigError, match="has no `head` module"):
        OVOR().setup(trainer, module, "fit")


# -- TEEN ---------------------------------------------------------------------------------------
def test_teen_calibration_matches_a_hand_computation():
    alpha, tau = 0.3, 16.0
    new, base = torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 3.0], [1.0, 1.0]])
    # cosines of the new prototype with the two base prototypes: 0 and 1/sqrt(2)
    w0, w1 = (math.exp(tau * c) for c in (0.0, 1 / math.sqrt(2)))
    w0, w1 = w0 / (w0 + w1), w1 / (w0 + w1)
    mix = [w1 / math.sqrt(2), w0 + w1 / math.sqrt(2)]  # w0 * (0, 1) + w1 * (1, 1) / sqrt(2)
    norm = math.hypot(*mix)
    expected = torch.tensor([[alpha + (1 - alpha) * mix[0] / norm, (1 - alpha) * mix[1] / norm]])
    torch.testing.assert_close(calibrate_prototypes(new, base, alpha, tau), expected)
    torch.testing.assert_close(calibrate_prototypes(new, base, 1.0, tau), torch.tensor([[1.0, 0.0]]))


def few_shot_run(tmp_path, name: str, teen: TEEN, ckpt_path=None):
    L.seed_everything(0, verbose=False)
    data = TaskSequenceDataModule(DigitsDataModule(flatten=True, batch_size=64), num_tasks=3,
                                  first_task_classes=6, shots=5)
    module = ClassificationModule("mlp", num_classes=10, input_shape=(64,), backbone_kwargs={"hidden_sizes": (16,)},
                                  cosine_head_temperature=16.0, lr=1e-2)
    runner = TaskSequenceRunner(module, data, [teen], TASK_TRAINER, run_dir=tmp_path / name, log=False)
    return runner, runner.run(ckpt_path)


def test_teen_sessions_are_training_free_and_set_calibrated_prototypes(tmp_path):
    teen = TEEN(alpha=0.5, tau=16.0)
    runner, matrix = few_shot_run(tmp_path, "teen", teen)
    module, data = runner.module, runner.datamodule
    base_end = torch.load(tmp_path / "teen/checkpoints/task_0_end.ckpt", weights_only=False)["state_dict"]
    for key, value in module.backbone.state_dict().items():  # no step after the base session
        torch.testing.assert_close(value, base_end[f"backbone.{key}"], rtol=0, atol=0)
    assert teen.base_classes == data.tasks[0]
    weight = module.head.weight.detach()
    for task in (1, 2):
        features = module.backbone(torch.stack([s["input"] for s in data.task_split("train", task)]))
        labels = torch.stack([s["target"] for s in data.task_split("train", task)])
        assert len(labels) == 5 * len(data.tasks[task])
        prototypes = calibrate_prototypes(class_means(features, labels, data.tasks[task]), weight[data.tasks[0]], 0.5, 16.0)
        torch.testing.assert_close(weight[data.tasks[task]], prototypes, rtol=1e-5, atol=1e-6)
    assert matrix.shape == (3, 3) and not torch.isnan(matrix.tril()).any()


def test_teen_resumes_exactly_at_a_session_boundary(tmp_path):
    straight, straight_matrix = few_shot_run(tmp_path, "straight", TEEN())
    resumed, resumed_matrix = few_shot_run(tmp_path, "resumed", TEEN(),
                                           ckpt_path=tmp_path / "straight/checkpoints/task_1_end.ckpt")
    torch.testing.assert_close(resumed_matrix, straight_matrix, equal_nan=True)
    for key, value in straight.module.state_dict().items():
        torch.testing.assert_close(resumed.module.state_dict()[key], value, rtol=0, atol=0, msg=key)


def test_teen_asks_for_a_cosine_head_in_a_task_sequence():
    module = ClassificationModule("mlp", num_classes=4, input_shape=(3,))
    trainer = SimpleNamespace(callbacks=[], datamodule=SimpleNamespace(tasks=[[0, 1], [2, 3]], batch_keys=None))
    with pytest.raises(TechniqueConfigError, match="cosine_head_temperature"):
        TEEN().setup(trainer, module, "fit")
    with pytest.raises(TechniqueConfigError, match="alpha must lie in"):
        TEEN(alpha=1.5)
