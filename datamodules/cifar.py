"""CIFAR-10 and CIFAR-100, read from the official "python version" pickles."""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torchvision
from torch import Tensor

from .base import ClassificationDataModule, Split
from .label_noise import CIFAR10_ASYMMETRIC_MAP, CIFAR100_ASYMMETRIC_MAP
from .splits import check_holdout_fractions, stratified_split


@dataclass(frozen=True)
class CifarLayout:
    """Where a CIFAR variant's files are, what their labels are called, and its channel statistics."""

    folder: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    label_key: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    asymmetric_map: dict[int, int]


# Channel mean/std of each training set (pixel values in [0, 1]).
CIFAR_LAYOUTS: dict[int, CifarLayout] = {
    10: CifarLayout(
        folder="cifar-10-batches-py",
        train_files=tuple(f"data_batch_{k}" for k in range(1, 6)),
        test_files=("test_batch",),
        label_key="labels",
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616),
        asymmetric_map=CIFAR10_ASYMMETRIC_MAP,
    ),
    100: CifarLayout(
        folder="cifar-100-python",
        train_files=("train",),
        test_files=("test",),
        label_key="fine_labels",
        mean=(0.5071, 0.4865, 0.4409),
        std=(0.2673, 0.2564, 0.2762),
        asymmetric_map=CIFAR100_ASYMMETRIC_MAP,
    ),
}


class CIFARDataModule(ClassificationDataModule):
    """CIFAR-10/100 as normalized ``(3, 32, 32)`` tensors; validation is a stratified part of the training files.

    The pickles are read directly (not through torchvision's dataset classes, whose checksum test
    rejects anything but the official archive), so tests can use tiny files in the same format.
    Nothing is downloaded unless ``download=True``, and then by :meth:`prepare_data`, which the
    Trainer calls before :meth:`setup`. ``LabelNoise(kind="asymmetric")`` without a ``class_map``
    uses the variant's ELR/Patrini map.

    Args:
        root: folder that contains ``cifar-10-batches-py/`` or ``cifar-100-python/``.
        variant: ``10`` or ``100``.
        download: download the archive into ``root`` with torchvision if it is not there.
        val_fraction: fraction of each class of the training files held out for validation.
        **kwargs: :class:`~reglab.datamodules.base.ClassificationDataModule` arguments.

    Example (needs the data on disk)::

        data = CIFARDataModule(root="data", variant=100, download=True, label_noise=LabelNoise(rate=0.4))
        trainer.fit(model, datamodule=data)
    """

    input_shape = (3, 32, 32)

    def __init__(
        self,
        root: str,
        variant: Literal[10, 100] = 10,
        download: bool = False,
        val_fraction: float = 0.1,
        **kwargs: Any,
    ) -> None:
        if variant not in CIFAR_LAYOUTS:
            raise ValueError(f"{type(self).__name__}: variant must be 10 or 100, got {variant!r}.")
        check_holdout_fractions(type(self).__name__, val_fraction=val_fraction)
        self.root = Path(root)
        self.variant = variant
        self.download = download
        self.val_fraction = val_fraction
        self.layout = CIFAR_LAYOUTS[variant]
        self.num_classes = variant
        self.default_asymmetric_map = self.layout.asymmetric_map
        super().__init__(**kwargs)

    def prepare_data(self) -> None:
        """Downloads and extracts the archive when ``download=True`` (torchvision skips it if already there)."""
        if self.download:
            dataset_class = torchvision.datasets.CIFAR10 if self.variant == 10 else torchvision.datasets.CIFAR100
            dataset_class(str(self.root), train=True, download=True)

    def _load_splits(self) -> dict[str, Split]:
        train_inputs, train_targets = self._read(self.layout.train_files)
        test_inputs, test_targets = self._read(self.layout.test_files)
        positions = stratified_split(train_targets, {"val": self.val_fraction}, self.seed)
        return {
            "train": (train_inputs[positions["train"]], train_targets[positions["train"]]),
            "val": (train_inputs[positions["val"]], train_targets[positions["val"]]),
            "test": (test_inputs, test_targets),
        }

    def _read(self, file_names: tuple[str, ...]) -> tuple[Tensor, Tensor]:
        """Normalized images and labels of the given pickles, concatenated in order."""
        folder = self.root / self.layout.folder
        missing = [name for name in file_names if not (folder / name).is_file()]
        if missing:
            how_to_get = (
                "prepare_data() downloads them; the Trainer calls it before setup(), call it yourself otherwise."
                if self.download
                else "Pass `download: true` to download them, or point `root` at the folder that contains"
                f" {self.layout.folder}/."
            )
            raise FileNotFoundError(
                f"{type(self).__name__}: CIFAR-{self.variant} files {missing} not found in {folder}. {how_to_get}"
            )
        images, labels = [], []
        for name in file_names:
            with open(folder / name, "rb") as file:
                # The official pickles were written by Python 2: latin1 is how torchvision reads them too.
                entries = pickle.load(file, encoding="latin1")
            entries = {key.decode() if isinstance(key, bytes) else key: value for key, value in entries.items()}
            images.append(np.asarray(entries["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels.extend(entries[self.layout.label_key])
        pixels = torch.from_numpy(np.concatenate(images)).float().div(255.0)
        mean = torch.tensor(self.layout.mean).view(3, 1, 1)
        std = torch.tensor(self.layout.std).view(3, 1, 1)
        return (pixels - mean) / std, torch.tensor(labels, dtype=torch.long)
