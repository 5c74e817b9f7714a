"""reglab's DataModules: every batch is a dict with ``input``, ``target``, ``index`` (and extras).

Embedded data needs no download (:class:`DigitsDataModule`, :class:`TabularDataModule`,
:class:`SyntheticDataModule`); :class:`CIFARDataModule` and :class:`ImageFolderDataModule` read the
papers' datasets from disk. All share :class:`ClassificationDataModule`'s label noise
(:class:`LabelNoise`), class imbalance (:class:`LongTail`) and mid-epoch resumable training loader.
"""

from .base import (
    ClassificationDataModule,
    DictDataset,
    LazyInputs,
    ResumableDataLoader,
    ResumableSampler,
)
from .cifar import CIFARDataModule
from .digits import DigitsDataModule
from .domains import RotatedDigitsDataModule, rotate_images
from .image_folder import ImageFolderDataModule, ImageFolderInputs
from .label_noise import (
    CIFAR10_ASYMMETRIC_MAP,
    CIFAR100_ASYMMETRIC_MAP,
    MNIST_ASYMMETRIC_MAP,
    LabelNoise,
    apply_label_noise,
)
from .long_tail import LongTail, apply_long_tail, long_tail_class_counts
from .splits import stratified_split
from .synthetic import SyntheticDataModule
from .tabular import TabularDataModule
from .text import TemplatedSentimentDataModule
from .tasks import TaskSequenceDataModule, TaskSubset, split_classes
from .class_split import ClassSplitDataModule
from .si_blurry import SiBlurryDataModule, SiBlurryStream, si_blurry_stream

__all__ = [
    "CIFAR10_ASYMMETRIC_MAP",
    "CIFAR100_ASYMMETRIC_MAP",
    "CIFARDataModule",
    "ClassificationDataModule",
    "DictDataset",
    "DigitsDataModule",
    "ImageFolderDataModule",
    "ImageFolderInputs",
    "LabelNoise",
    "LazyInputs",
    "LongTail",
    "MNIST_ASYMMETRIC_MAP",
    "ResumableDataLoader",
    "ResumableSampler",
    "RotatedDigitsDataModule",
    "SyntheticDataModule",
    "TabularDataModule",
    "TaskSequenceDataModule",
    "TemplatedSentimentDataModule",
    "ClassSplitDataModule",
    "SiBlurryDataModule",
    "SiBlurryStream",
    "TaskSubset",
    "apply_label_noise",
    "apply_long_tail",
    "long_tail_class_counts",
    "rotate_images",
    "si_blurry_stream",
    "split_classes",
    "stratified_split",
]
