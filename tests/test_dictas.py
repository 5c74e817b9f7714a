"""DictAS (paper 19), the anomaly scenes and the anomaly module with its nearest-neighbour lookup (the
baseline): the maths against hand-computed cases (the shared harness covers accumulation, resume, bf16 and
stacking)."""

from __future__ import annotations

import doctest
import importlib

import numpy as np
import pytest
import torch

from reglab.callbacks.anomaly.dictas import DictAS, DictionaryLookup, contrastive_query_constraint, sparsemax
from reglab.datamodules.anomaly_scenes import (AnomalyScenesDataModule, add_noise, changed_pixels, cut_out, paste_patch,
                                               synthesize_anomaly)
from reglab.tasks.anomaly import AnomalySegmentationModule, NearestPatchLookup, normal_patch_loss, patch_mask, patch_scores
from reglab.technique import TechniqueConfigError

# -- anomaly synthesis -------------------------------------------------------------------------------------


def test_paste_noise_cutout_change_exactly_their_square():
    image = np.zeros((4, 4), np.float32)
    image[1, 1] = 1.0
    pasted = paste_patch(image, np.full((2, 2), 0.5, np.float32), 2, 3)  # cut at the right border
    expected = image.copy()
    expected[2:4, 3] = 0.5
    np.testing.assert_array_equal(pasted, expected)
    noisy = add_noise(image, np.array([[0.3, -0.3], [2.0, 0.05]], np.float32), 0, 0)
    np.testing.assert_allclose(noisy[:2, :2], [[0.3, 0.0], [1.0, 1.0]])  # clipped to [0, 1]
    np.testing.assert_array_equal(cut_out(image, 0, 0, 2), np.zeros((4, 4)))
    assert image[1, 1] == 1.0  # the functions return copies
    mask = changed_pixels(image, noisy, min_change=0.1)
    assert mask.tolist() == [[True, False, False, False], [True, False, False, False], [False] * 4, [False] * 4]


def test_cutout_removes_digit_pixels_and_its_mask_is_what_changed():
    image = np.zeros((8, 8), np.float32)
    image[2:6, 2:6] = 1.0  # a digit as wide as the foreign digit below (4 pixels)
    rng = np.random.default_rng(0)
    after, mask = synthesize_anomaly(image, "cutout", np.zeros((4, 4), np.float32), rng, 2, 2, 0.5, 0.1)
    assert mask.sum() > 0 and (image[mask] == 1.0).all() and (after[mask] == 0.0).all()
    np.testing.assert_array_equal(mask, np.abs(after - image) > 0.1)
    # an 8-pixel cut with 4-pixel digits is capped at 2 pixels: the digit never vanishes whole
    after, mask = synthesize_anomaly(image, "cutout", np.zeros((4, 4), np.float32), rng, 8, 8, 0.5, 0.1)
    assert 0 < mask.sum() <= 4 and after.sum() >= 12


def test_paste_of_background_onto_background_is_no_anomaly():
    image = np.zeros((8, 8), np.float32)
    after, mask = synthesize_anomaly(image, "paste", np.zeros((6, 6), np.float32), np.random.default_rng(0), 3, 3, 0.5, 0.1)
    assert not mask.any() and np.array_equal(after, image)


# -- the DataModule -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scenes():
    data = AnomalyScenesDataModule(num_train=12, num_val=6, num_test=10, shots=2, train_bank=3, batch_size=4, seed=1)
    data.setup()
    return data


def test_test_scenes_hold_only_unseen_classes_with_fixed_references(scenes):
    test, train = scenes.test_dataset, scenes.train_dataset
    assert set(train.extras["scene_class"].tolist()) <= {0, 1, 2, 3, 4}
    classes = test.extras["scene_class"]
    assert set(classes.tolist()) <= {5, 6, 7, 8, 9}
    for digit in classes.unique():
        references = test.extras["reference"][classes == digit]
        assert (references == references[:1]).all()  # every test query of a class has the same k shots
    assert torch.equal(test.extras["anomalous"], test.targets.flatten(1).any(1).long())
    assert test.extras["reference"].shape == (10, 2, 1, 32, 32)


def test_scenes_are_seeded(scenes):
    again = AnomalyScenesDataModule(num_train=12, num_val=6, num_test=10, shots=2, train_bank=3, batch_size=4, seed=1)
    again.setup()
    assert torch.equal(again.test_dataset.inputs, scenes.test_dataset.inputs)
    assert torch.equal(again.train_dataset.targets, scenes.train_dataset.targets)


def test_bad_arguments_fail_early():
    with pytest.raises(ValueError, match="kinds"):
        AnomalyScenesDataModule(kinds=["scratch"])
    with pytest.raises(ValueError, match="train_bank >= shots"):
        AnomalyScenesDataModule(shots=4, train_bank=2)


# -- the module's scores and losses ------------------------------------------------------------------------


def test_scores_and_losses_by_hand():
    assert torch.allclose(patch_scores(torch.tensor([[0.0, 1.0]]), torch.tensor([[1.0, 0.0]])), torch.tensor([0.5]))
    scores = torch.tensor([[[0.1, 0.3], [0.9, 0.5]]])
    anomalous = torch.tensor([[[False, False], [True, False]]])
    assert torch.allclose(normal_patch_loss(scores, anomalous), torch.tensor([0.3]), atol=1e-5)
    # image 1: normal 0.3 > anomalous 0.1 -> 0.2; image 2: 0.1 < 0.9 -> 0; image 3 has no anomaly -> 0
    stacked = torch.tensor([[[0.3, 0.1]], [[0.1, 0.9]], [[0.7, 0.7]]])
    marks = torch.tensor([[[False, True]], [[False, True]], [[False, False]]])
    assert torch.allclose(contrastive_query_constraint([stacked, stacked], marks), torch.tensor(0.4), atol=1e-4)
    target = torch.zeros(1, 4, 4)
    target[0, :2, :2] = 1
    assert patch_mask(target, (2, 2)).tolist() == [[[True, False], [False, False]]]


def test_sparsemax_and_its_jacobian_by_hand():
    z = torch.tensor([1.0, 0.5, -1.0])
    assert torch.allclose(sparsemax(z), torch.tensor([0.75, 0.25, 0.0]))
    assert torch.allclose(sparsemax(torch.zeros(2, 4), dim=0), torch.full((2, 4), 0.5))
    # on the support S = {0, 1}: J = I - 1 1ᵀ / |S|, zero elsewhere
    jacobian = torch.autograd.functional.jacobian(sparsemax, z)
    assert torch.allclose(jacobian, torch.tensor([[0.5, -0.5, 0.0], [-0.5, 0.5, 0.0], [0.0, 0.0, 0.0]]))


def test_nearest_lookup_rebuilds_a_query_found_among_the_references():
    module = AnomalySegmentationModule(input_shape=(1, 32, 32), grid=8)
    assert isinstance(module.lookup, NearestPatchLookup) and not module.trains_anything()
    assert module.configure_optimizers() is None
    query = torch.rand(1, 1, 32, 32)
    batch = {"input": query, "reference": torch.stack([torch.rand(1, 1, 32, 32), query], 1),
             "target": torch.zeros(1, 32, 32, dtype=torch.long)}
    out = module.eval().forward_step(batch)
    assert out.logits.abs().max() < 1e-5  # every query patch is in the dictionary: nothing is anomalous
    batch["reference"] = torch.rand(1, 2, 1, 32, 32)
    assert module.forward_step(batch).logits.min() > 0


def test_dictas_trains_only_its_lookup_and_restores_from_a_checkpoint():
    torch.manual_seed(0)
    module = AnomalySegmentationModule(input_shape=(1, 32, 32), backbone_kwargs={"channels": [8, 16, 32]}, grid=4)
    technique = DictAS(heads=4)
    technique.install(module)
    target = torch.zeros(2, 32, 32, dtype=torch.long)
    target[:, :12, :12] = 1
    out = module.forward_step({"input": torch.rand(2, 1, 32, 32), "reference": torch.rand(2, 2, 1, 32, 32), "target": target})
    loss = module.task_loss(out).mean() + technique.loss_terms(out, module)["cqc"] + 1.0 * out.logits.mean()
    loss.backward()
    assert all(p.grad is None for p in module.backbone.parameters())
    assert all(p.grad is not None for p in module.lookup.query_generator.parameters())
    checkpoint = {"state_dict": module.state_dict()}
    technique.on_save_checkpoint(None, module, checkpoint)
    bare = AnomalySegmentationModule(input_shape=(1, 32, 32), backbone_kwargs={"channels": [8, 16, 32]}, grid=4)
    rng = torch.get_rng_state()
    bare.on_load_checkpoint(checkpoint)
    assert torch.equal(torch.get_rng_state(), rng)  # a resumed run's restored RNG stream is left as it was
    bare.load_state_dict(checkpoint["state_dict"])
    assert isinstance(bare.lookup, DictionaryLookup)
    assert torch.equal(bare.lookup.key_generator.q.weight, module.lookup.key_generator.q.weight)


def test_bad_settings_and_another_module_fail_clearly():
    from reglab.tasks import SegmentationModule

    with pytest.raises(TechniqueConfigError, match="AnomalySegmentationModule"):
        DictAS().install(SegmentationModule(num_classes=11, input_shape=(1, 32, 32)))
    with pytest.raises(TechniqueConfigError, match="divisible"):
        DictAS(heads=5).install(AnomalySegmentationModule(input_shape=(1, 32, 32)))
    with pytest.raises(ValueError, match="pooling"):
        AnomalySegmentationModule(input_shape=(1, 32, 32), pooling=[2])


@pytest.mark.parametrize("name", ["reglab.tasks.anomaly", "reglab.callbacks.anomaly.dictas", "reglab.datamodules.anomaly_scenes"])
def test_docstring_examples_run(name):
    assert doctest.testmod(importlib.import_module(name), verbose=False).failed == 0
