"""Image datasets laid out as torchvision ImageFolders: ``root/{train,val[,test]}/<class>/<image>``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor
from torchvision import transforms
from torchvision.datasets import ImageFolder

from .base import ClassificationDataModule, Split


class ImageFolderInputs:
    """The images of an :class:`~torchvision.datasets.ImageFolder`, decoded only when accessed.

    A :class:`~reglab.datamodules.base.LazyInputs`: it stands in for an ``(N, 3, size, size)`` tensor, so
    the base DataModule can subsample (long tail) and index it like one without loading every image.
    """

    def __init__(self, folder: ImageFolder, positions: Optional[Tensor] = None) -> None:
        self.folder = folder
        self.positions = torch.arange(len(folder)) if positions is None else positions

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, position: int) -> Tensor:
        image, _ = self.folder[int(self.positions[position])]
        return image

    def subset(self, positions: Tensor) -> ImageFolderInputs:
        return ImageFolderInputs(self.folder, self.positions[positions])


class ImageFolderDataModule(ClassificationDataModule):
    """Images resized to ``image_size × image_size`` RGB tensors in [0, 1], decoded lazily per batch.

    Classes are the sub-folders of ``root/train`` in sorted order (ImageFolder's convention); ``val``
    and ``test`` must have the same class folders. Without ``root/test`` the validation images also
    serve as the test split (as usual for ImageNet-style layouts).

    Args:
        root: folder holding ``train/``, ``val/`` and optionally ``test/``.
        image_size: side length images are resized to.
        **kwargs: :class:`~reglab.datamodules.base.ClassificationDataModule` arguments.

    Example (needs images on disk)::

        data = ImageFolderDataModule(root="data/imagenette", image_size=64, batch_size=32)
        data.num_classes  # number of class folders in data/imagenette/train
    """

    def __init__(self, root: str, image_size: int = 32, **kwargs: Any) -> None:
        self.root = Path(root)
        train_folder = self.root / "train"
        if not train_folder.is_dir():
            raise FileNotFoundError(
                f"{type(self).__name__}: no training folder {train_folder}; root must hold train/<class>/<image>"
                " and val/<class>/<image> (and optionally test/)."
            )
        self.classes = sorted(entry.name for entry in train_folder.iterdir() if entry.is_dir())
        self.image_size = image_size
        self.num_classes = len(self.classes)
        self.input_shape = (3, image_size, image_size)
        super().__init__(**kwargs)

    def _load_splits(self) -> dict[str, Split]:
        has_test_folder = (self.root / "test").is_dir()
        splits = {"train": self._read("train"), "val": self._read("val")}
        splits["test"] = self._read("test") if has_test_folder else splits["val"]
        return splits

    def _read(self, split: str) -> tuple[ImageFolderInputs, Tensor]:
        to_tensor = transforms.Compose([transforms.Resize((self.image_size, self.image_size)), transforms.ToTensor()])
        folder = ImageFolder(str(self.root / split), transform=to_tensor)
        # ImageFolder numbers the classes it finds; a missing or extra class folder would shift every label.
        if folder.classes != self.classes:
            raise ValueError(
                f"{type(self).__name__}: the {split!r} split has class folders {folder.classes}, but train has"
                f" {self.classes}; every split needs the same class folders."
            )
        return ImageFolderInputs(folder), torch.tensor(folder.targets, dtype=torch.long)
