"""CAFA: the class statistics, the Mahalanobis distances, the loss and its gradient against
hand-computed values; the statistics in the checkpoint; a test run leaves checkpoint and model."""

from __future__ import annotations

import doctest
import math

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from reglab.callbacks.domain_generalization.cafa import (
    CAFA,
    cafa_loss,
    class_statistics,
    mahalanobis_distances,
    precision_matrices,
)
from reglab.datamodules import DigitsDataModule
from reglab.registry import example_module, example_trainer
from reglab.technique import TechniqueConfigError, dataset_features


def bn_module(seed: int = 0):
    return example_module(seed, backbone_kwargs={"norm": "batch"})


def digits() -> DigitsDataModule:
    return DigitsDataModule(flatten=True, batch_size=256)


def test_class_statistics_match_the_hand_computed_means_and_covariances():
    features = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0], [4.0, 4.0]])
    counts, means, covariances = class_statistics(features, torch.tensor([0, 0, 1, 1]), num_classes=3)
    assert counts.tolist() == [2, 2, 0]
    torch.testing.assert_close(means.float(), torch.tensor([[1.0, 0.0], [2.0, 3.0], [0.0, 0.0]]))
    # class 0: centred (-1, 0), (1, 0); class 1: centred (-2, -1), (2, 1); divided by N_c
    expected = torch.tensor([[[1.0, 0.0], [0.0, 0.0]], [[4.0, 2.0], [2.0, 1.0]], [[0.0, 0.0], [0.0, 0.0]]])
    torch.testing.assert_close(covariances.float(), expected)


def test_precisions_invert_the_ridged_class_or_pooled_covariance():
    counts = torch.tensor([1, 3])
    covariances = torch.tensor([[[2.0, 0.0], [0.0, 4.0]], [[6.0, 0.0], [0.0, 8.0]]])
    torch.testing.assert_close(precision_matrices(counts, covariances, "class", 0.0).float(),
                               torch.tensor([[[0.5, 0.0], [0.0, 0.25]], [[1 / 6, 0.0], [0.0, 0.125]]]))
    # pooled = (1 * diag(2, 4) + 3 * diag(6, 8)) / 4 = diag(5, 7); ridge 0.5 * mean(5, 7) = 3
    torch.testing.assert_close(precision_matrices(counts, covariances, "shared", 0.5).float(),
                               torch.tensor([[[1 / 8, 0.0], [0.0, 0.1]]]))


def test_mahalanobis_distances_and_the_loss_match_the_hand_computed_values():
    means = torch.tensor([[0.0, 0.0], [2.0, 0.0]])
    per_class = torch.stack([torch.diag(torch.tensor([0.25, 1.0])), torch.eye(2)])
    features = torch.tensor([[1.0, 1.0], [2.0, 1.0]])
    # x1: D0 = 1/4 + 1, D1 = 1 + 1; x2: D0 = 4/4 + 1 = 2, D1 = 0 + 1 = 1
    distances = mahalanobis_distances(features, means, per_class)
    torch.testing.assert_close(distances, torch.tensor([[1.25, 2.0], [2.0, 1.0]]))
    torch.testing.assert_close(mahalanobis_distances(features, means, torch.eye(2)[None]),
                               torch.tensor([[2.0, 2.0], [5.0, 1.0]]))
    logits = torch.tensor([[3.0, 0.0], [5.0, 1.0]])  # both predicted as class 0
    expected = (math.log(1.25 / 3.25) + math.log(2.0 / 3.0)) / 2
    assert float(cafa_loss(features, logits, means, per_class)) == pytest.approx(expected)


def test_the_loss_gradient_pulls_a_feature_towards_its_predicted_class():
    # identity covariance, x = (1, 1), means (0, 0) and (2, 0), predicted class 0:
    # L = log D0 - log(D0 + D1), dL/dx = 2x / D0 - (2x + 2(x - mu1)) / (D0 + D1) = mu1 / 2 = (1, 0)
    features = torch.tensor([[1.0, 1.0]], requires_grad=True)
    loss = cafa_loss(features, torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 0.0], [2.0, 0.0]]), torch.eye(2)[None])
    (grad,) = torch.autograd.grad(loss, features)
    torch.testing.assert_close(grad, torch.tensor([[1.0, 0.0]]))


def test_checkpoints_hold_the_statistics_of_their_own_weights(tmp_path):
    """Every checkpoint holds the statistics of the weights it holds (recomputed when written);
    a test from it restores them, and changes neither the file nor the model."""
    module, data, cafa = bn_module(), digits(), CAFA()
    checkpoint = ModelCheckpoint(dirpath=tmp_path, filename="{step}", every_n_train_steps=2, save_top_k=-1)
    example_trainer(max_steps=4, enable_checkpointing=True, callbacks=[cafa, checkpoint]).fit(module, datamodule=data)
    for step in (2, 4):
        saved = torch.load(tmp_path / f"step={step}.ckpt", weights_only=True)
        stats = saved["callbacks"]["cafa"]
        assert stats["statistics_step"] == step
        reloaded = bn_module()
        reloaded.load_state_dict(saved["state_dict"])
        features, labels = dataset_features(reloaded, data.train_dataset)
        _, means, covariances = class_statistics(features, labels, 10)
        torch.testing.assert_close(stats["means"], means.float())
        torch.testing.assert_close(stats["covariances"], covariances.float())

    path = tmp_path / "step=2.ckpt"
    on_disk, weights = path.read_bytes(), torch.load(path, weights_only=True)["state_dict"]
    fresh = CAFA()
    example_trainer(callbacks=[fresh]).test(bn_module(), datamodule=data, ckpt_path=str(path), verbose=False)
    assert fresh.statistics_step == 2
    assert path.read_bytes() == on_disk
    restored = bn_module()
    example_trainer(callbacks=[CAFA()]).test(restored, datamodule=data, ckpt_path=str(path), verbose=False)
    for key, value in restored.state_dict().items():
        assert torch.equal(value, weights[key]), key


def test_a_model_fitted_without_cafa_gets_the_statistics_from_the_training_split():
    module, data = bn_module(), digits()
    example_trainer(max_steps=2).fit(module, datamodule=data)
    cafa = CAFA()
    (logged,) = example_trainer(callbacks=[cafa]).test(module, datamodule=data, verbose=False)
    assert cafa.means is not None and math.isfinite(logged["test/cafa/adaptation_loss"])


def test_bad_arguments_are_refused():
    with pytest.raises(TechniqueConfigError, match="covariance 'full'"):
        CAFA(covariance="full")
    with pytest.raises(TechniqueConfigError, match="ridge=-1"):
        CAFA(ridge=-1)


def test_docstring_example_runs():
    import reglab.callbacks.domain_generalization.cafa

    assert doctest.testmod(reglab.callbacks.domain_generalization.cafa, verbose=False).failed == 0
