"""Tests of datamodules/: batches, splits, label noise, long tail, validation, loaders and exact resume."""

from __future__ import annotations

import doctest
import pickle
from pathlib import Path

import lightning
import numpy as np
import pytest
import torch
from jsonargparse import ArgumentParser
from lightning.pytorch.callbacks import ModelCheckpoint
from PIL import Image
from torch.utils.data import DistributedSampler

import reglab.datamodules
from reglab.datamodules import (
    CIFARDataModule,
    ClassificationDataModule,
    DictDataset,
    DigitsDataModule,
    ImageFolderDataModule,
    LabelNoise,
    LongTail,
    MNIST_ASYMMETRIC_MAP,
    ResumableDataLoader,
    ResumableSampler,
    SyntheticDataModule,
    TabularDataModule,
    apply_label_noise,
    apply_long_tail,
    stratified_split,
)
from reglab.datamodules import base, cifar, digits, image_folder, label_noise, long_tail, splits, synthetic, tabular


class ArrayDataModule(ClassificationDataModule):
    """A DataModule over splits given as tensors, to feed the base class arbitrary (also broken) data."""

    def __init__(self, splits: dict, num_classes: int = 3, input_shape: tuple[int, ...] = (2,), **kwargs) -> None:
        self.splits = splits
        self.num_classes = num_classes
        self.input_shape = input_shape
        super().__init__(**kwargs)

    def _load_splits(self) -> dict:
        return self.splits


def valid_split(num_samples: int = 6, num_classes: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(num_samples, 2), torch.arange(num_samples) % num_classes


# ----------------------------------------------------------------------------------------------
# Batches of the embedded DataModules


EMBEDDED = {
    "digits-image": lambda: DigitsDataModule(batch_size=32),
    "digits-flat": lambda: DigitsDataModule(flatten=True, batch_size=32),
    "iris": lambda: TabularDataModule(name="iris", batch_size=16),
    "wine": lambda: TabularDataModule(name="wine", batch_size=16),
    "breast_cancer": lambda: TabularDataModule(name="breast_cancer", batch_size=16),
    "synthetic": lambda: SyntheticDataModule(
        num_samples=300, num_features=6, num_classes=3, num_informative=3, batch_size=16
    ),
}


@pytest.mark.parametrize("make", EMBEDDED.values(), ids=EMBEDDED.keys())
def test_embedded_batches_are_dicts_with_documented_keys_dtypes_and_shapes(make):
    data = make()
    num_classes, input_shape = data.num_classes, data.input_shape  # known before any data is loaded
    data.setup("fit")
    assert data.batch_keys == {"input", "target", "index"}
    for loader in (data.train_dataloader(), data.val_dataloader(), data.test_dataloader(), data.predict_dataloader()):
        batch = next(iter(loader))
        assert set(batch) == {"input", "target", "index"}
        assert batch["input"].dtype == torch.float32
        assert batch["input"].shape[1:] == input_shape
        assert batch["target"].dtype == torch.int64 and batch["index"].dtype == torch.int64
        assert len(batch["input"]) == len(batch["target"]) == len(batch["index"]) == loader.batch_size
        assert ((batch["target"] >= 0) & (batch["target"] < num_classes)).all()


def test_digits_pixels_are_scaled_to_unit_interval_and_every_class_is_in_every_split():
    data = DigitsDataModule()
    data.setup("fit")
    for dataset in (data.train_dataset, data.val_dataset, data.test_dataset):
        assert dataset.inputs.min() == 0.0 and dataset.inputs.max() == 1.0
        assert set(dataset.targets.tolist()) == set(range(10))
    sizes = [len(data.train_dataset), len(data.val_dataset), len(data.test_dataset)]
    assert sum(sizes) == 1797
    assert sizes[1] == pytest.approx(0.15 * 1797, abs=10) and sizes[2] == pytest.approx(0.25 * 1797, abs=10)


def test_tabular_is_standardized_with_training_split_statistics_only():
    data = TabularDataModule(name="wine")
    data.setup("fit")
    train = data.train_dataset.inputs
    torch.testing.assert_close(train.mean(dim=0), torch.zeros(13), atol=1e-5, rtol=0)
    torch.testing.assert_close(train.std(dim=0), torch.ones(13), atol=1e-5, rtol=0)
    # Held-out data is standardized with the training statistics, so it is not exactly standard.
    assert not torch.allclose(data.test_dataset.inputs.mean(dim=0), torch.zeros(13), atol=1e-5)


def test_index_is_the_position_in_the_split_it_comes_from():
    data = DigitsDataModule(flatten=True, batch_size=50)
    data.setup("fit")
    for dataset, loader in ((data.train_dataset, data.train_dataloader()), (data.val_dataset, data.val_dataloader())):
        seen = []
        for batch in loader:
            torch.testing.assert_close(batch["input"], dataset.inputs[batch["index"]], atol=0, rtol=0)
            torch.testing.assert_close(batch["target"], dataset.targets[batch["index"]], atol=0, rtol=0)
            seen.append(batch["index"])
        assert sorted(torch.cat(seen).tolist()) == list(range(len(dataset)))


def test_datasets_and_batch_keys_need_setup_and_setup_runs_once():
    data = DigitsDataModule()
    with pytest.raises(RuntimeError, match="setup"):
        data.batch_keys
    with pytest.raises(RuntimeError, match="trainer"):
        data.fit_progress()
    data.setup("fit")
    train_dataset = data.train_dataset
    data.setup("test")
    assert data.train_dataset is train_dataset


def test_datamodule_arguments_parse_from_yaml_with_jsonargparse():
    parser = ArgumentParser()
    parser.add_subclass_arguments(ClassificationDataModule, "data")
    config = parser.parse_string(
        """
        data:
          class_path: reglab.datamodules.DigitsDataModule
          init_args:
            flatten: true
            batch_size: 16
            label_noise: {kind: asymmetric, rate: 0.3, class_map: {7: 1, 2: 7}}
            long_tail: {imbalance_ratio: 10}
        """
    )
    data = parser.instantiate(config).data
    assert isinstance(data, DigitsDataModule) and data.batch_size == 16 and data.input_shape == (64,)
    assert data.label_noise == LabelNoise(kind="asymmetric", rate=0.3, class_map={7: 1, 2: 7})
    assert data.long_tail == LongTail(imbalance_ratio=10.0)


# ----------------------------------------------------------------------------------------------
# Splits


def test_stratified_split_is_disjoint_complete_stratified_and_seeded():
    targets = torch.arange(5).repeat_interleave(40)
    parts = stratified_split(targets, {"val": 0.25, "test": 0.5}, seed=3)
    assert sorted(torch.cat(list(parts.values())).tolist()) == list(range(200))
    class_counts = [torch.bincount(targets[parts[name]]).tolist() for name in ("train", "val", "test")]
    assert class_counts == [[10] * 5, [10] * 5, [20] * 5]
    again = stratified_split(targets, {"val": 0.25, "test": 0.5}, seed=3)
    other = stratified_split(targets, {"val": 0.25, "test": 0.5}, seed=4)
    assert all(torch.equal(parts[name], again[name]) for name in parts)
    assert not torch.equal(parts["val"], other["val"])


def test_datamodule_splits_are_reproducible_per_seed():
    def train_and_val_inputs(seed):
        data = DigitsDataModule(flatten=True, seed=seed)
        data.setup("fit")
        return data.train_dataset.inputs, data.val_dataset.inputs

    first, again, other = train_and_val_inputs(0), train_and_val_inputs(0), train_and_val_inputs(1)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[1], other[1])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"val_fraction": 0.0}, "val_fraction must lie in"),
        ({"val_fraction": 0.5, "test_fraction": 0.5}, "must stay below 1"),
    ],
)
def test_bad_split_fractions_are_rejected_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DigitsDataModule(**kwargs)


# ----------------------------------------------------------------------------------------------
# Label noise


CLEAN_LABELS = torch.arange(10).repeat(1000)  # 10,000 samples, 1,000 per class


def test_symmetric_noise_changes_the_expected_fraction_of_labels_reproducibly():
    noise = LabelNoise(kind="symmetric", rate=0.4, seed=7)
    noisy = apply_label_noise(CLEAN_LABELS, 10, noise)
    # ELR draws the new label from all classes, so 1/C of the chosen samples keep their label.
    changed = (noisy != CLEAN_LABELS).float().mean().item()
    assert changed == pytest.approx(0.4 * 9 / 10, abs=0.015)
    assert torch.equal(noisy, apply_label_noise(CLEAN_LABELS, 10, noise))
    assert not torch.equal(noisy, apply_label_noise(CLEAN_LABELS, 10, LabelNoise(rate=0.4, seed=8)))
    assert torch.equal(CLEAN_LABELS, torch.arange(10).repeat(1000))  # input untouched


def test_symmetric_noise_without_the_true_label_changes_exactly_rate_times_n_labels():
    noisy = apply_label_noise(CLEAN_LABELS, 10, LabelNoise(rate=0.37, include_true_label=False))
    assert int((noisy != CLEAN_LABELS).sum()) == round(0.37 * len(CLEAN_LABELS))
    flipped_to = noisy[noisy != CLEAN_LABELS]
    assert len(flipped_to.unique()) == 10  # uniform over the other classes reaches every class


def test_asymmetric_noise_flips_only_mapped_classes_to_their_targets():
    class_map = {7: 1, 2: 7, 5: 6, 6: 5, 3: 8}
    noisy = apply_label_noise(CLEAN_LABELS, 10, LabelNoise(kind="asymmetric", rate=0.3, class_map=class_map))
    for cls in range(10):
        of_class = noisy[CLEAN_LABELS == cls]
        if cls in class_map:
            assert set(of_class.unique().tolist()) == {cls, class_map[cls]}
            assert (of_class == class_map[cls]).float().mean().item() == pytest.approx(0.3, abs=0.05)
        else:
            assert (of_class == cls).all()


def test_pairflip_noise_moves_class_c_to_c_plus_one_cyclically():
    noisy = apply_label_noise(CLEAN_LABELS, 10, LabelNoise(kind="pairflip", rate=0.45))
    changed = noisy != CLEAN_LABELS
    assert torch.equal(noisy[changed], (CLEAN_LABELS[changed] + 1) % 10)
    assert 0 in noisy[changed & (CLEAN_LABELS == 9)].tolist()
    assert changed.float().mean().item() == pytest.approx(0.45, abs=0.02)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rate": 1.5}, "rate must lie in"),
        ({"kind": "uniform"}, "unknown kind"),
        ({"kind": "symmetric", "class_map": {0: 1}}, "only applies to kind='asymmetric'"),
    ],
)
def test_label_noise_configuration_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LabelNoise(**kwargs)


def test_label_noise_class_map_must_fit_the_dataset():
    with pytest.raises(ValueError, match=r"classes \[12\] outside \[0, 10\)"):
        DigitsDataModule(label_noise=LabelNoise(kind="asymmetric", class_map={3: 12}))
    with pytest.raises(ValueError, match="needs a class_map"):
        apply_label_noise(CLEAN_LABELS, 10, LabelNoise(kind="asymmetric"))


def test_noisy_datamodule_keeps_clean_targets_and_leaves_val_and_test_clean():
    clean = DigitsDataModule(flatten=True, seed=2)
    noisy = DigitsDataModule(flatten=True, seed=2, label_noise=LabelNoise(rate=0.5, seed=5))
    clean.setup("fit")
    noisy.setup("fit")
    assert noisy.batch_keys == {"input", "target", "index", "clean_target"}
    assert torch.equal(noisy.train_dataset.extras["clean_target"], clean.train_dataset.targets)
    assert torch.equal(noisy.train_dataset.inputs, clean.train_dataset.inputs)
    changed = (noisy.train_dataset.targets != clean.train_dataset.targets).float().mean().item()
    assert changed == pytest.approx(0.5 * 9 / 10, abs=0.05)
    for split in ("val_dataset", "test_dataset"):
        assert torch.equal(getattr(noisy, split).targets, getattr(clean, split).targets)
        assert "clean_target" not in getattr(noisy, split).keys
    batch = next(iter(noisy.train_dataloader()))
    assert torch.equal(batch["clean_target"], clean.train_dataset.targets[batch["index"]])


def test_asymmetric_noise_defaults_to_the_datasets_standard_map_or_asks_for_one():
    data = DigitsDataModule(label_noise=LabelNoise(kind="asymmetric", rate=1.0))
    assert data.label_noise.class_map == MNIST_ASYMMETRIC_MAP
    data.setup("fit")
    clean, noisy = data.train_dataset.extras["clean_target"], data.train_dataset.targets
    for cls in range(10):
        assert (noisy[clean == cls] == MNIST_ASYMMETRIC_MAP.get(cls, cls)).all()
    with pytest.raises(ValueError, match="SyntheticDataModule: asymmetric label noise needs a class_map"):
        SyntheticDataModule(label_noise=LabelNoise(kind="asymmetric"))


# ----------------------------------------------------------------------------------------------
# Long tail


def test_long_tail_reproduces_the_cifar10_lt_class_counts():
    targets = torch.arange(10).repeat_interleave(5000)  # balanced like CIFAR-10's training set
    kept = apply_long_tail(targets, 10, LongTail(imbalance_ratio=100.0))
    # CIFAR-10-LT at ratio 100 (Cao et al., 2019): 12,406 training images.
    assert torch.bincount(targets[kept]).tolist() == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    assert torch.equal(kept, kept.sort().values) and len(kept.unique()) == len(kept)
    assert not torch.equal(kept, apply_long_tail(targets, 10, LongTail(imbalance_ratio=100.0, seed=1)))


def test_long_tail_caps_each_class_at_what_it_has_and_rejects_ratios_that_empty_a_class():
    targets = torch.tensor([0] * 100 + [1] * 10 + [2] * 60)
    kept = apply_long_tail(targets, 3, LongTail(imbalance_ratio=4.0))
    assert torch.bincount(targets[kept]).tolist() == [100, 10, 25]  # class 1 wants 50 but has 10
    with pytest.raises(ValueError, match="leaves class 2 without training samples"):
        apply_long_tail(targets, 3, LongTail(imbalance_ratio=1000.0))
    with pytest.raises(ValueError, match="must be ≥ 1"):
        LongTail(imbalance_ratio=0.5)


def test_datamodule_long_tail_applies_to_train_only_then_noise_on_the_kept_samples():
    balanced = DigitsDataModule(flatten=True)
    tailed = DigitsDataModule(flatten=True, long_tail=LongTail(imbalance_ratio=10.0), label_noise=LabelNoise(rate=0.2))
    balanced.setup("fit")
    tailed.setup("fit")
    available = torch.bincount(balanced.train_dataset.targets)
    n_max = int(available.max())
    expected = [min(int(n_max * 0.1 ** (c / 9)), int(available[c])) for c in range(10)]
    clean_kept = tailed.train_dataset.extras["clean_target"]
    assert torch.bincount(clean_kept).tolist() == expected
    assert tailed.num_train_samples == sum(expected) == len(tailed.train_dataset)
    assert torch.equal(tailed.test_dataset.targets, balanced.test_dataset.targets)
    assert torch.equal(tailed.val_dataset.inputs, balanced.val_dataset.inputs)
    # The kept samples are rows of the balanced training set with their own labels.
    rows = (tailed.train_dataset.inputs[:, None, :] == balanced.train_dataset.inputs[None]).all(dim=-1)
    matches = rows.float().argmax(dim=1)
    assert rows.any(dim=1).all() and torch.equal(balanced.train_dataset.targets[matches], clean_kept)


# ----------------------------------------------------------------------------------------------
# Validation of what subclasses load


@pytest.mark.parametrize(
    ("broken_split", "message"),
    [
        ((torch.randn(4, 2), torch.tensor([0, 1, 7, -1])), r"labels outside \[0, 3\), e.g. \[-1, 7\]"),
        ((torch.randn(0, 2), torch.tensor([], dtype=torch.long)), "is empty"),
        ((torch.randn(4, 5), torch.tensor([0, 1, 2, 0])), r"per-sample shape \(5,\), but input_shape is \(2,\)"),
        ((torch.randn(5, 2), torch.tensor([0, 1, 2, 0])), "inputs and targets of different length"),
        ((torch.randn(4, 2), torch.tensor([0.0, 1.0, 2.0, 0.0])), "1-D integer targets"),
    ],
    ids=["bad-labels", "empty", "wrong-shape", "length-mismatch", "float-targets"],
)
def test_broken_splits_raise_value_errors_naming_datamodule_split_and_problem(broken_split, message):
    data = ArrayDataModule({"train": valid_split(), "val": broken_split, "test": valid_split()})
    with pytest.raises(ValueError, match=rf"ArrayDataModule: the 'val' split .*{message}"):
        data.setup("fit")


def test_missing_split_and_reserved_extra_names_are_rejected():
    with pytest.raises(ValueError, match=r"returned no \['test'\] split"):
        ArrayDataModule({"train": valid_split(), "val": valid_split()}).setup("fit")
    with pytest.raises(ValueError, match="may not be named"):
        DictDataset(torch.zeros(2, 1), torch.zeros(2, dtype=torch.long), {"index": torch.zeros(2)})


def test_extras_and_predict_split_are_carried_into_batches():
    inputs, targets = valid_split()
    train = (inputs, targets, {"domain": torch.tensor([0, 0, 0, 1, 1, 1])})
    splits = {"train": train, "val": valid_split(), "test": valid_split(), "predict": valid_split(2)}
    data = ArrayDataModule(splits, batch_size=6)
    data.setup("fit")
    assert data.batch_keys == {"input", "target", "index", "domain"}
    batch = next(iter(data.train_dataloader()))
    assert torch.equal(batch["domain"], train[2]["domain"][batch["index"]])
    assert len(next(iter(data.predict_dataloader()))["index"]) == 2


# ----------------------------------------------------------------------------------------------
# CIFAR from tiny files in the official format


def write_cifar_pickle(path: Path, images: np.ndarray, labels: list[int], label_key: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    entries = {b"data": images.reshape(len(images), 3072), label_key: labels, b"batch_label": b"fake"}
    if label_key == b"fine_labels":
        entries[b"coarse_labels"] = [label // 5 for label in labels]
    with open(path, "wb") as file:
        pickle.dump(entries, file, protocol=2)


def fake_images(num_images: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(num_images, 3, 32, 32), dtype=np.uint8)


@pytest.fixture
def cifar10_root(tmp_path: Path) -> Path:
    folder = tmp_path / "cifar-10-batches-py"
    for k in range(1, 6):
        write_cifar_pickle(folder / f"data_batch_{k}", fake_images(20, k), [i % 10 for i in range(20)], b"labels")
    write_cifar_pickle(folder / "test_batch", fake_images(10, 0), list(range(10))[::-1], b"labels")
    return tmp_path


def test_cifar10_reads_the_official_pickle_layout(cifar10_root: Path):
    data = CIFARDataModule(root=str(cifar10_root), val_fraction=0.2, batch_size=8)
    assert (data.num_classes, data.input_shape) == (10, (3, 32, 32))
    data.setup("fit")
    assert (len(data.train_dataset), len(data.val_dataset), len(data.test_dataset)) == (80, 20, 10)
    assert data.test_dataset.targets.tolist() == list(range(10))[::-1]
    mean, std = torch.tensor(cifar.CIFAR_LAYOUTS[10].mean), torch.tensor(cifar.CIFAR_LAYOUTS[10].std)
    raw = torch.from_numpy(fake_images(10, 0)).float() / 255
    torch.testing.assert_close(data.test_dataset.inputs, (raw - mean.view(3, 1, 1)) / std.view(3, 1, 1))
    batch = next(iter(data.train_dataloader()))
    assert batch["input"].shape == (8, 3, 32, 32) and batch["target"].dtype == torch.int64


def test_cifar100_reads_fine_labels(tmp_path: Path):
    labels = list(range(100)) * 2
    write_cifar_pickle(tmp_path / "cifar-100-python" / "train", fake_images(200, 1), labels, b"fine_labels")
    write_cifar_pickle(tmp_path / "cifar-100-python" / "test", fake_images(100, 2), list(range(100)), b"fine_labels")
    data = CIFARDataModule(
        root=str(tmp_path), variant=100, val_fraction=0.5, label_noise=LabelNoise(kind="asymmetric", rate=1.0)
    )
    data.setup("fit")
    assert data.num_classes == 100 and len(data.train_dataset) == 100 and len(data.val_dataset) == 100
    assert sorted(data.train_dataset.extras["clean_target"].tolist()) == list(range(100))
    # ELR's CIFAR-100 map: the next class within each block of five (4 → 0, 99 → 95).
    clean, noisy = data.train_dataset.extras["clean_target"], data.train_dataset.targets
    assert torch.equal(noisy, clean - clean % 5 + (clean + 1) % 5)


@pytest.mark.parametrize(("download", "hint"), [(False, "Pass `download: true`"), (True, "prepare_data")])
def test_cifar_missing_files_raise_a_clear_error(tmp_path: Path, download: bool, hint: str):
    data = CIFARDataModule(root=str(tmp_path), download=download)
    with pytest.raises(FileNotFoundError, match=rf"CIFAR-10 files .*data_batch_1.* not found in {tmp_path}.*{hint}"):
        data.setup("fit")


# ----------------------------------------------------------------------------------------------
# ImageFolder from tiny PNGs


def write_image_folder(root: Path, counts: dict[str, dict[str, int]]) -> None:
    colours = {"cat": (255, 0, 0), "dog": (0, 0, 255)}
    for split, per_class in counts.items():
        for cls, count in per_class.items():
            (root / split / cls).mkdir(parents=True)
            for k in range(count):
                Image.new("RGB", (10, 12), colours[cls]).save(root / split / cls / f"{k}.png")


def test_image_folder_batches_with_long_tail_and_noise(tmp_path: Path):
    write_image_folder(tmp_path, {"train": {"cat": 6, "dog": 6}, "val": {"cat": 2, "dog": 2}})
    data = ImageFolderDataModule(
        root=str(tmp_path),
        image_size=8,
        batch_size=4,
        long_tail=LongTail(imbalance_ratio=3.0),
        label_noise=LabelNoise(rate=1.0, include_true_label=False),
    )
    assert (data.num_classes, data.input_shape, data.classes) == (2, (3, 8, 8), ["cat", "dog"])
    data.setup("fit")
    assert torch.bincount(data.train_dataset.extras["clean_target"]).tolist() == [6, 2]
    assert len(data.test_dataset) == 4  # no test/ folder: the val images serve as test
    for batch in data.train_dataloader():
        assert batch["input"].shape[1:] == (3, 8, 8) and batch["input"].dtype == torch.float32
        # Red images are cats, blue ones dogs; with two classes every noisy label is the other one.
        is_dog = batch["input"][:, 2].mean(dim=(1, 2)) > 0.5
        assert torch.equal(batch["clean_target"], is_dog.long())
        assert torch.equal(batch["target"], 1 - batch["clean_target"])
    val_batch = next(iter(data.val_dataloader()))
    assert val_batch["target"].tolist() == [0, 0, 1, 1] and set(val_batch) == {"input", "target", "index"}


def test_image_folder_rejects_missing_or_mismatched_folders(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="no training folder"):
        ImageFolderDataModule(root=str(tmp_path))
    write_image_folder(tmp_path, {"train": {"cat": 1, "dog": 1}, "val": {"cat": 1}})
    with pytest.raises(ValueError, match=r"'val' split has class folders \['cat'\], but train has \['cat', 'dog'\]"):
        ImageFolderDataModule(root=str(tmp_path)).setup("fit")


# ----------------------------------------------------------------------------------------------
# ResumableSampler and ResumableDataLoader


def test_sampler_is_a_distributed_sampler_with_full_padded_length_per_rank():
    samplers = [ResumableSampler(10, num_replicas=3, rank=rank, seed=0) for rank in range(3)]
    assert all(isinstance(sampler, DistributedSampler) for sampler in samplers)  # so Lightning keeps it under DDP
    assert [len(sampler) for sampler in samplers] == [4, 4, 4]
    indices = [index for sampler in samplers for index in sampler]
    assert set(indices) == set(range(10)) and len(indices) == 12  # two padding repeats, as DistributedSampler


def test_two_replicas_are_disjoint_and_cover_the_dataset():
    ranks = [list(ResumableSampler(11, num_replicas=2, rank=rank, seed=5)) for rank in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 6
    even = [list(ResumableSampler(10, num_replicas=2, rank=rank, seed=5)) for rank in (0, 1)]
    assert not set(even[0]) & set(even[1]) and set(even[0]) | set(even[1]) == set(range(10))
    assert set(ranks[0]) | set(ranks[1]) == set(range(11))


def test_sampler_order_is_a_function_of_seed_and_epoch():
    def order(seed, epoch, shuffle=True):
        sampler = ResumableSampler(50, seed=seed, shuffle=shuffle)
        sampler.set_epoch(epoch)
        return list(sampler)

    assert order(0, 3) == order(0, 3)
    assert order(0, 3) != order(0, 4) and order(0, 3) != order(1, 3)
    assert order(0, 3, shuffle=False) == list(range(50))
    reference = DistributedSampler(range(50), num_replicas=1, rank=0, seed=0)
    reference.set_epoch(3)
    assert order(0, 3) == list(reference)


def test_sampler_resume_skips_once_and_only_in_its_epoch():
    sampler = ResumableSampler(20, num_replicas=2, rank=1, seed=0)
    sampler.set_epoch(2)
    full = list(sampler)
    sampler.resume(epoch=2, samples_done_per_rank=7)
    assert list(sampler) == full[7:] and len(sampler) == 10
    assert list(sampler) == full  # the resume point is used up
    sampler.resume(epoch=5, samples_done_per_rank=7)
    assert list(sampler) == full  # epoch 2 is not the resumed epoch
    with pytest.raises(ValueError, match=r"must lie in \[0, 10\]"):
        sampler.resume(epoch=0, samples_done_per_rank=11)


def test_loader_state_comes_from_progress_fn_and_resumes_batch_aligned():
    dataset = DictDataset(torch.arange(10.0)[:, None], torch.zeros(10, dtype=torch.long))
    sampler = ResumableSampler(dataset, seed=0)
    loader = ResumableDataLoader(dataset, 4, sampler=sampler, progress_fn=lambda: (0, 2))
    full = torch.cat([batch["index"] for batch in loader])
    assert loader.state_dict() == {"epoch": 0, "batches_done": 2}
    loader.load_state_dict({"epoch": 0, "batches_done": 1})
    assert [batch["index"].tolist() for batch in loader] == [full[4:8].tolist(), full[8:].tolist()]
    loader.load_state_dict({"epoch": 0, "batches_done": 3})  # all three batches, the last one partial
    assert list(loader) == [] and len(loader) == 3
    with pytest.raises(RuntimeError, match="needs progress_fn"):
        ResumableDataLoader(dataset, 4, sampler=sampler).state_dict()


def test_creating_and_iterating_a_loader_leaves_the_global_rng_alone():
    data = DigitsDataModule(flatten=True)
    data.setup("fit")
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    for loader in (data.train_dataloader(), data.val_dataloader()):
        next(iter(loader))
    assert torch.equal(torch.rand(3), expected)


def test_an_epoch_set_after_iter_but_before_the_first_batch_takes_effect_with_workers():
    dataset = DictDataset(torch.zeros(12, 1), torch.zeros(12, dtype=torch.long))
    sampler = ResumableSampler(dataset, seed=0)
    loader = ResumableDataLoader(dataset, 4, sampler=sampler, num_workers=1)
    iterator = iter(loader)  # Lightning makes the first iterator of a run before set_epoch
    sampler.set_epoch(3)
    sampler.resume(epoch=3, samples_done_per_rank=4)
    expected = ResumableSampler(dataset, seed=0)
    expected.set_epoch(3)
    assert torch.cat([batch["index"] for batch in iterator]).tolist() == list(expected)[4:]


# ----------------------------------------------------------------------------------------------
# End to end: a run stopped mid-epoch and resumed equals the uninterrupted run


TOTAL_STEPS, CHECKPOINT_EVERY = 80, 17  # 34 batches per epoch: checkpoints at 17, 34 (epoch end), 51, 68


class LinearClassifier(lightning.LightningModule):
    """A module reglab did not write: a linear layer on flattened digits, recording batch indices."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(64, 10)
        self.seen_indices: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        self.seen_indices.append(batch["index"].clone())
        return torch.nn.functional.cross_entropy(self.layer(batch["input"]), batch["target"])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def fit_digits(
    max_steps: int, checkpoint_dir: Path, ckpt_path: Path | None = None, num_workers: int = 0
) -> LinearClassifier:
    torch.manual_seed(0)
    model = LinearClassifier()
    trainer = lightning.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[ModelCheckpoint(dirpath=checkpoint_dir, every_n_train_steps=CHECKPOINT_EVERY, save_top_k=-1)],
    )
    data = DigitsDataModule(flatten=True, batch_size=32, num_workers=num_workers, label_noise=LabelNoise(rate=0.2))
    trainer.fit(model, datamodule=data, ckpt_path=ckpt_path)
    return model


@pytest.fixture(scope="module")
def uninterrupted_run(tmp_path_factory) -> tuple[LinearClassifier, Path]:
    checkpoint_dir = tmp_path_factory.mktemp("uninterrupted")
    model = fit_digits(TOTAL_STEPS, checkpoint_dir)
    assert len(model.seen_indices) == TOTAL_STEPS
    return model, checkpoint_dir


def assert_resumed_equals_uninterrupted(
    resumed: LinearClassifier, uninterrupted: LinearClassifier, from_step: int
) -> None:
    assert len(resumed.seen_indices) == TOTAL_STEPS - from_step
    for resumed_batch, reference_batch in zip(resumed.seen_indices, uninterrupted.seen_indices[from_step:]):
        assert torch.equal(resumed_batch, reference_batch)
    for resumed_param, reference_param in zip(resumed.parameters(), uninterrupted.parameters()):
        torch.testing.assert_close(resumed_param, reference_param, atol=0, rtol=0)


def test_run_stopped_mid_epoch_and_resumed_matches_the_uninterrupted_run(uninterrupted_run, tmp_path: Path):
    reference, _ = uninterrupted_run
    stop_step = 3 * CHECKPOINT_EVERY  # 51: the 17th of the 34 batches of epoch 1
    stopped = fit_digits(stop_step, tmp_path / "stopped")
    [checkpoint] = (tmp_path / "stopped").glob(f"*step={stop_step}.ckpt")
    assert torch.load(checkpoint, weights_only=False)["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [
        {"epoch": 1, "batches_done": 17}
    ]
    assert all(torch.equal(a, b) for a, b in zip(stopped.seen_indices, reference.seen_indices))
    resumed = fit_digits(TOTAL_STEPS, tmp_path / "resumed", ckpt_path=checkpoint)
    assert_resumed_equals_uninterrupted(resumed, reference, stop_step)


@pytest.mark.parametrize(
    ("from_step", "num_workers"),
    [(2 * CHECKPOINT_EVERY, 0), (3 * CHECKPOINT_EVERY, 1), (4 * CHECKPOINT_EVERY, 1)],
    ids=["epoch-end", "mid-epoch-with-worker", "epoch-end-with-worker"],
)
def test_resume_from_checkpoints_of_the_uninterrupted_run(
    uninterrupted_run, tmp_path: Path, from_step: int, num_workers: int
):
    reference, checkpoint_dir = uninterrupted_run
    [checkpoint] = checkpoint_dir.glob(f"*step={from_step}.ckpt")
    resumed = fit_digits(TOTAL_STEPS, tmp_path, ckpt_path=checkpoint, num_workers=num_workers)
    assert_resumed_equals_uninterrupted(resumed, reference, from_step)


# ----------------------------------------------------------------------------------------------
# Docstring examples stay runnable


@pytest.mark.parametrize(
    "module",
    [base, digits, tabular, synthetic, cifar, image_folder, label_noise, long_tail, splits],
    ids=lambda module: module.__name__,
)
def test_docstring_examples_run(module):
    result = doctest.testmod(module, verbose=False)
    assert result.failed == 0


def test_package_exports_every_public_name():
    missing = [name for name in reglab.datamodules.__all__ if not hasattr(reglab.datamodules, name)]
    assert missing == []
