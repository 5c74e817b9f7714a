"""Tests of datamodules/scenes.py: the generated digit scenes, noisy masks, long tail and the DataModule."""

from __future__ import annotations

import doctest
from pathlib import Path

import lightning
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from sklearn.datasets import load_digits

from reglab.datamodules import (
    DigitScenesDataModule,
    DigitsDataModule,
    MaskNoise,
    apply_mask_noise,
    long_tail_class_weights,
    make_digit_scenes,
)
from reglab.datamodules import scenes as scenes_module


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    data = load_digits()
    return torch.tensor(data.images, dtype=torch.float32) / 16, torch.tensor(data.target)


@pytest.fixture(scope="module")
def scenes(digits):
    return make_digit_scenes(*digits, num_scenes=300, seed=0)


# ----------------------------------------------------------------------------------------------
# The generator


def test_masks_instances_and_counts_describe_the_same_objects(scenes):
    assert torch.equal(scenes.masks > 0, scenes.instances > 0)
    assert (scenes.instance_counts[:, 0] == 0).all()
    for n in range(len(scenes.masks)):
        num_objects = int(scenes.instances[n].max())
        assert 1 <= num_objects <= 4
        assert int(scenes.instance_counts[n].sum()) == num_objects
        assert (scenes.sources[n, :num_objects] >= 0).all() and (scenes.sources[n, num_objects:] == -1).all()
        counted = torch.zeros(11, dtype=torch.long)
        for k in range(1, num_objects + 1):
            classes = scenes.masks[n][scenes.instances[n] == k].unique()
            assert len(classes) == 1, "an instance has exactly one class"
            counted[classes] += 1
        assert torch.equal(counted, scenes.instance_counts[n])


def test_objects_are_at_least_one_background_pixel_apart(scenes):
    for n in range(0, len(scenes.masks), 7):
        for k in range(1, int(scenes.instances[n].max()) + 1):
            region = (scenes.instances[n] == k).float()[None, None]
            grown = F.max_pool2d(region, 3, stride=1, padding=1)[0, 0] > 0
            others = (scenes.instances[n] > 0) & (scenes.instances[n] != k)
            assert not (grown & others).any()


def test_mask_pixels_are_the_bright_pixels_of_the_placed_digits(scenes):
    assert scenes.images.shape == (300, 1, 32, 32)
    assert scenes.images.min() >= 0 and scenes.images.max() <= 1
    assert (scenes.images[:, 0][scenes.masks > 0] > 0.4).all()


def test_scenes_are_a_function_of_the_seed(digits, scenes):
    again = make_digit_scenes(*digits, num_scenes=300, seed=0)
    other = make_digit_scenes(*digits, num_scenes=300, seed=1)
    assert torch.equal(again.images, scenes.images) and torch.equal(again.masks, scenes.masks)
    assert not torch.equal(other.masks, scenes.masks)


def test_every_digit_count_occurs_and_the_larger_canvas_fits_four_big_digits(digits, scenes):
    assert set(scenes.instance_counts.sum(1).tolist()) == {1, 2, 3, 4}
    big = make_digit_scenes(*digits, num_scenes=50, canvas=48, scale=2, min_digits=4, max_digits=4, seed=0)
    assert big.masks.shape == (50, 48, 48) and (big.instance_counts.sum(1) == 4).float().mean() > 0.5


def test_long_tail_profile_makes_tail_digits_rare_in_images(digits):
    weights = long_tail_class_weights(50.0)
    assert torch.isclose(weights.sum(), torch.tensor(1.0, dtype=weights.dtype))
    assert torch.isclose(weights[0] / weights[-1], torch.tensor(50.0, dtype=weights.dtype))
    assert (weights[1:] < weights[:-1]).all()
    tailed = make_digit_scenes(*digits, num_scenes=1500, class_weights=weights, seed=0)
    images_with = (tailed.instance_counts[:, 1:] > 0).sum(0)  # per digit: images containing it
    assert images_with.argmax() == 0 and images_with.argmin() == 9
    # under the profile digit 9 is 50x rarer than digit 0; ask for at least 10x in the drawn scenes
    assert images_with[9] * 10 < images_with[0]
    rare_images = tailed.instance_counts[:, 10] > 0
    assert (tailed.instance_counts[rare_images, 1:10].sum(1) > 0).any(), "rare digits co-occur with common ones"


def test_generator_rejects_bad_arguments(digits):
    images, labels = digits
    with pytest.raises(ValueError, match="canvas=10 is smaller than a digit"):
        make_digit_scenes(images, labels, 2, canvas=10)
    with pytest.raises(ValueError, match="min_digits ≤ max_digits"):
        make_digit_scenes(images, labels, 2, min_digits=3, max_digits=2)
    with pytest.raises(ValueError, match="no digit image of classes \\[9\\]"):
        make_digit_scenes(images[labels != 9], labels[labels != 9], 2)
    with pytest.raises(ValueError, match="must be \\(M, 8, 8\\)"):
        make_digit_scenes(images[:, :4], labels, 2)


# ----------------------------------------------------------------------------------------------
# Noisy masks on hand-made masks


def square_scene(size: int = 11) -> tuple[torch.Tensor, torch.Tensor]:
    """One 11×11 image: a 3×3 object of class 4 (digit 3) at rows/cols 4..6."""
    masks = torch.zeros(1, size, size, dtype=torch.long)
    masks[0, 4:7, 4:7] = 4
    return masks, (masks > 0).long()


def test_dilation_grows_an_object_by_radius_pixels_with_its_class():
    masks, instances = square_scene()
    noisy = apply_mask_noise(masks, instances, MaskNoise(dilate=1.0, radius=1))
    expected = torch.zeros_like(masks)
    expected[0, 3:8, 3:8] = 4
    assert torch.equal(noisy, expected)
    assert torch.equal(masks, square_scene()[0]), "the clean mask is left unchanged"


def test_erosion_shrinks_an_object_by_radius_pixels():
    masks = torch.zeros(1, 11, 11, dtype=torch.long)
    masks[0, 2:9, 2:9] = 7
    noisy = apply_mask_noise(masks, (masks > 0).long(), MaskNoise(erode=1.0, radius=2))
    expected = torch.zeros_like(masks)
    expected[0, 4:7, 4:7] = 7
    assert torch.equal(noisy, expected)


def test_dilation_grows_into_background_only_never_over_another_object():
    masks = torch.zeros(1, 5, 9, dtype=torch.long)
    masks[0, 1:4, 1:4], masks[0, 1:4, 5:8] = 2, 3   # two squares, one background column apart
    instances = torch.zeros_like(masks)
    instances[0, 1:4, 1:4], instances[0, 1:4, 5:8] = 1, 2
    noisy = apply_mask_noise(masks, instances, MaskNoise(dilate=1.0, radius=2))
    assert torch.equal(noisy[masks == 3], masks[masks == 3]) and torch.equal(noisy[masks == 2], masks[masks == 2])
    assert (noisy[:, :, 4] == 2).all(), "the gap goes to the first object"


def test_shift_moves_an_object_without_changing_its_shape_or_class():
    masks, instances = square_scene()
    for seed in range(6):
        noisy = apply_mask_noise(masks, instances, MaskNoise(shift=1.0, max_shift=2, seed=seed))
        rows, cols = (noisy[0] == 4).nonzero().T
        assert int((noisy > 0).sum()) == 9 and set(noisy.unique().tolist()) == {0, 4}
        dy, dx = int(rows.min()) - 4, int(cols.min()) - 4
        assert (dy, dx) != (0, 0) and max(abs(dy), abs(dx)) <= 2
        assert int(rows.max() - rows.min()) == 2 and int(cols.max() - cols.min()) == 2


def test_drop_makes_the_object_background():
    masks, instances = square_scene()
    assert int(apply_mask_noise(masks, instances, MaskNoise(drop=1.0)).count_nonzero()) == 0


def test_flip_gives_the_whole_object_another_digit_class():
    masks, instances = square_scene()
    flipped = {int(apply_mask_noise(masks, instances, MaskNoise(flip=1.0, seed=seed))[0, 5, 5]) for seed in range(40)}
    assert 4 not in flipped and 0 not in flipped and flipped <= set(range(1, 11)) and len(flipped) > 3
    noisy = apply_mask_noise(masks, instances, MaskNoise(flip=1.0))
    assert torch.equal(noisy > 0, masks > 0) and len(noisy[noisy > 0].unique()) == 1


def test_noise_rates_and_independent_draws_per_kind(scenes):
    objects = int(scenes.instance_counts.sum())
    dropped = apply_mask_noise(scenes.masks, scenes.instances, MaskNoise(drop=0.3, seed=5))
    survivors = {(n, k) for n in range(300) for k in range(1, int(scenes.instances[n].max()) + 1)
                 if (dropped[n][scenes.instances[n] == k] > 0).any()}
    assert abs(1 - len(survivors) / objects - 0.3) < 0.05
    also_flipped = apply_mask_noise(scenes.masks, scenes.instances, MaskNoise(drop=0.3, flip=1.0, seed=5))
    assert torch.equal(also_flipped > 0, dropped > 0), "enabling flips leaves the drop decisions alone"
    assert torch.equal(apply_mask_noise(scenes.masks, scenes.instances, MaskNoise(drop=0.3, seed=5)), dropped)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"flip": 1.5}, "flip is a probability"),
        ({"dilate": 0.6, "erode": 0.6}, "exceeds 1"),
        ({"radius": 0}, "radius must be at least 1"),
        ({"max_shift": 0}, "max_shift must be at least 1"),
    ],
)
def test_mask_noise_rejects_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MaskNoise(**kwargs)


# ----------------------------------------------------------------------------------------------
# The DataModule


def test_shape_is_known_before_setup_and_batches_carry_the_documented_keys():
    data = DigitScenesDataModule(canvas=48, scale=2, num_train=24, num_val=8, num_test=8, batch_size=8,
                                 mask_noise=MaskNoise(dilate=0.5, flip=0.5))
    assert (data.num_classes, data.input_shape) == (11, (1, 48, 48))
    with pytest.raises(RuntimeError, match="call setup"):
        data.num_train_samples
    data.setup("fit")
    assert data.num_train_samples == 24
    assert data.batch_keys == {"input", "target", "index", "instances", "instance_counts", "clean_target"}
    batch = next(iter(data.train_dataloader()))
    shapes = {key: (tuple(value.shape), value.dtype) for key, value in batch.items()}
    assert shapes == {
        "input": ((8, 1, 48, 48), torch.float32), "target": ((8, 48, 48), torch.long), "index": ((8,), torch.long),
        "instances": ((8, 48, 48), torch.long), "instance_counts": ((8, 11), torch.long),
        "clean_target": ((8, 48, 48), torch.long),
    }


def test_noise_and_long_tail_apply_to_training_scenes_only():
    data = DigitScenesDataModule(num_train=400, num_val=400, num_test=400, imbalance_ratio=20.0,
                                 mask_noise=MaskNoise(flip=0.5))
    data.setup()
    train = data.train_dataset
    assert not torch.equal(train.targets, train.extras["clean_target"])
    assert torch.equal(train.extras["clean_target"], data.scenes["train"].masks)
    for split in (data.val_dataset, data.test_dataset):
        assert "clean_target" not in split.extras
    counts = {name: data.scenes[name].instance_counts[:, 1:].sum(0) for name in ("train", "test")}
    assert counts["train"][0] > 5 * counts["train"][9]
    assert counts["test"].max() < 2 * counts["test"].min(), "test digits stay balanced"


def test_digit_images_of_the_splits_come_from_disjoint_pools():
    data = DigitScenesDataModule(num_train=200, num_val=100, num_test=100, seed=3)
    data.setup()
    pools = DigitsDataModule(seed=3)
    pools.setup()
    pool_of = {"train": pools.train_dataset, "val": pools.val_dataset, "test": pools.test_dataset}
    used = {}
    for split, scenes in data.scenes.items():
        sources = scenes.sources[scenes.sources >= 0].unique()
        used[split] = {pool_of[split].inputs[int(s)].numpy().tobytes() for s in sources}
    assert not used["train"] & used["test"] and not used["train"] & used["val"] and not used["val"] & used["test"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"canvas": 8}, "canvas=8 is smaller than a digit"),
        ({"scale": 0.5}, "scale must be ≥ 1"),
        ({"min_digits": 0}, "1 ≤ min_digits ≤ max_digits"),
        ({"num_val": 0}, "num_val must be at least 1 scene"),
        ({"imbalance_ratio": 0.5}, "imbalance_ratio is the head/tail"),
        ({"mask_noise": {"flip": 0.2}}, "mask_noise must be a MaskNoise"),
        ({"val_fraction": 0.6, "test_fraction": 0.5}, "must stay below 1"),
        ({"batch_size": 0}, "batch_size must be at least 1"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        DigitScenesDataModule(**kwargs)


# ----------------------------------------------------------------------------------------------
# Exact resume in the middle of an epoch


class PixelClassifier(lightning.LightningModule):
    """A 1×1 convolution per pixel, recording the batch indices it trained on."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Conv2d(1, 11, 1)
        self.seen_indices: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        self.seen_indices.append(batch["index"].clone())
        return F.cross_entropy(self.layer(batch["input"]), batch["target"])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


TOTAL_STEPS = 20  # 8 batches per epoch; checkpoints every 5 steps: step 10 is batch 2 of epoch 1


def fit_scenes(checkpoint_dir: Path, ckpt_path: Path | None = None) -> PixelClassifier:
    torch.manual_seed(0)
    model = PixelClassifier()
    trainer = lightning.Trainer(
        accelerator="cpu", max_steps=TOTAL_STEPS, logger=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[ModelCheckpoint(dirpath=checkpoint_dir, every_n_train_steps=5, save_top_k=-1)],
    )
    data = DigitScenesDataModule(num_train=64, num_val=8, num_test=8, batch_size=8, mask_noise=MaskNoise(flip=0.3))
    trainer.fit(model, datamodule=data, ckpt_path=ckpt_path)
    return model


def test_run_resumed_mid_epoch_matches_the_uninterrupted_run(tmp_path: Path):
    reference = fit_scenes(tmp_path / "uninterrupted")
    [checkpoint] = (tmp_path / "uninterrupted").glob("*step=10.ckpt")
    state = torch.load(checkpoint, weights_only=False)["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert state == [{"epoch": 1, "batches_done": 2}]
    resumed = fit_scenes(tmp_path / "resumed", ckpt_path=checkpoint)
    assert len(resumed.seen_indices) == TOTAL_STEPS - 10
    for resumed_batch, reference_batch in zip(resumed.seen_indices, reference.seen_indices[10:]):
        assert torch.equal(resumed_batch, reference_batch)
    for resumed_param, reference_param in zip(resumed.parameters(), reference.parameters()):
        torch.testing.assert_close(resumed_param, reference_param, atol=0, rtol=0)


def test_docstring_examples_run():
    assert doctest.testmod(scenes_module, verbose=False).failed == 0
