"""RotatedDigitsDataModule: one domain per angle, each image in one domain, fixed pools, seeded."""

from __future__ import annotations

import doctest

import pytest
import torch

import reglab.datamodules.domains
from reglab.datamodules import DigitsDataModule, LabelNoise, RotatedDigitsDataModule, rotate_images


def rows(images: torch.Tensor) -> set[tuple[float, ...]]:
    return {tuple(row.tolist()) for row in images.reshape(len(images), -1)}


@pytest.fixture(scope="module")
def rotated() -> RotatedDigitsDataModule:
    data = RotatedDigitsDataModule(train_angles=[0, 15, 30], test_angles=[60], split_seed=0, seed=3, batch_size=32)
    data.setup("fit")
    return data


def test_rotation_is_counter_clockwise_and_exact_at_right_angles():
    image = torch.arange(64.0).reshape(1, 1, 8, 8)
    assert torch.equal(rotate_images(image, 90), torch.rot90(image, 1, dims=(-2, -1)))
    assert torch.equal(rotate_images(image, 0), image)
    tilted = rotate_images(image, 45)
    assert tilted.shape == image.shape and not torch.equal(tilted, image)


def test_every_split_holds_its_angles_as_domains_with_balanced_classes(rotated):
    assert rotated.domain_angles == (0.0, 15.0, 30.0, 60.0) and rotated.num_domains == 4
    for dataset, domains in ((rotated.train_dataset, [0, 1, 2]), (rotated.val_dataset, [0, 1, 2]), (rotated.test_dataset, [3])):
        domain, targets = dataset.extras["domain"], dataset.targets
        assert sorted(domain.unique().tolist()) == domains
        for cls in range(10):
            per_domain = torch.bincount(domain[targets == cls], minlength=4)[domains]
            assert per_domain.max() - per_domain.min() <= 1, (cls, per_domain)


def test_each_upright_image_appears_once_at_its_domains_angle(rotated):
    upright = DigitsDataModule(seed=0)  # split_seed 0: the same pools
    upright.setup()
    train = rotated.train_dataset
    assert len(train) == len(upright.train_dataset)
    at_zero = train.inputs[train.extras["domain"] == 0]
    assert rows(at_zero) <= rows(upright.train_dataset.inputs)
    at_thirty = train.inputs[train.extras["domain"] == 2]
    assert not rows(at_thirty) & rows(upright.train_dataset.inputs)
    assert torch.equal(rotated.test_dataset.targets, upright.test_dataset.targets)


def test_split_seed_fixes_the_pools_while_seed_reshuffles_the_domains():
    def built(**kwargs) -> RotatedDigitsDataModule:
        data = RotatedDigitsDataModule(train_angles=[0, 90], test_angles=[0], **kwargs)
        data.setup()
        return data

    a, b, c = built(split_seed=0, seed=1), built(split_seed=0, seed=2), built(split_seed=0, seed=1)
    assert rows(a.test_dataset.inputs) == rows(b.test_dataset.inputs)  # the same upright test pool
    assert not torch.equal(a.train_dataset.extras["domain"], b.train_dataset.extras["domain"])
    assert torch.equal(a.train_dataset.inputs, c.train_dataset.inputs)
    assert torch.equal(a.train_dataset.extras["domain"], c.train_dataset.extras["domain"])
    d = built(seed=1)  # split_seed defaults to seed: another pool
    assert d.split_seed == 1 and rows(d.test_dataset.inputs) != rows(a.test_dataset.inputs)


def test_batches_carry_the_domain_and_flatten_and_label_noise_work():
    data = RotatedDigitsDataModule(flatten=True, batch_size=16, label_noise=LabelNoise(rate=0.4))
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    assert batch["input"].shape == (16, 64) and batch["domain"].dtype == torch.long
    assert {"domain", "clean_target", "index"} <= data.batch_keys
    assert data.val_angles == data.train_angles


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"train_angles": []}, "train_angles is empty"),
        ({"test_angles": [60, 60]}, "test_angles repeats an angle"),
        ({"val_fraction": 0.6, "test_fraction": 0.5}, "must stay below 1"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RotatedDigitsDataModule(**kwargs)


def test_docstring_examples_run():
    assert doctest.testmod(reglab.datamodules.domains, verbose=False).failed == 0
