"""Generated classification data (scikit-learn's ``make_classification``), any size, no download."""

from __future__ import annotations

from typing import Any

import torch
from sklearn.datasets import make_classification

from .base import ClassificationDataModule, Split
from .splits import check_holdout_fractions, stratified_split

# make_classification's default; it needs num_classes · clusters ≤ 2 ** num_informative.
CLUSTERS_PER_CLASS = 2


class SyntheticDataModule(ClassificationDataModule):
    """Gaussian clusters on a hypercube's vertices, generated and split with the DataModule's ``seed``.

    ``num_informative`` features carry the classes; the other features are pure noise (no redundant
    or repeated features).

    Args:
        num_samples: samples generated in total, before the split.
        num_features: features per sample.
        num_classes: number of classes.
        num_informative: informative features (≤ ``num_features``).
        class_sep: hypercube size; larger is easier.
        val_fraction: fraction of each class held out for validation.
        test_fraction: fraction of each class held out for testing.
        **kwargs: :class:`~reglab.datamodules.base.ClassificationDataModule` arguments.

    Example:
        >>> data = SyntheticDataModule(num_samples=200, num_features=5, num_classes=3, num_informative=3)
        >>> data.setup("fit")
        >>> data.input_shape, data.num_train_samples
        ((5,), 120)
    """

    def __init__(
        self,
        num_samples: int = 2000,
        num_features: int = 20,
        num_classes: int = 4,
        num_informative: int = 10,
        class_sep: float = 1.0,
        val_fraction: float = 0.15,
        test_fraction: float = 0.25,
        **kwargs: Any,
    ) -> None:
        name = type(self).__name__
        if num_classes < 2:
            raise ValueError(f"{name}: num_classes must be at least 2, got {num_classes}.")
        if not 1 <= num_informative <= num_features:
            raise ValueError(
                f"{name}: num_informative must lie in [1, num_features={num_features}], got {num_informative}."
            )
        needed_informative = (num_classes * CLUSTERS_PER_CLASS - 1).bit_length()  # smallest k with 2**k ≥ clusters
        if num_informative < needed_informative:
            raise ValueError(
                f"{name}: {num_classes} classes need num_informative ≥ {needed_informative} (got {num_informative})"
                " so that each class gets its own hypercube vertices."
            )
        check_holdout_fractions(name, val_fraction=val_fraction, test_fraction=test_fraction)
        self.num_samples = num_samples
        self.num_informative = num_informative
        self.class_sep = class_sep
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.num_classes = num_classes
        self.input_shape = (num_features,)
        super().__init__(**kwargs)

    def _load_splits(self) -> dict[str, Split]:
        features, labels = make_classification(
            n_samples=self.num_samples,
            n_features=self.input_shape[0],
            n_informative=self.num_informative,
            n_redundant=0,
            n_repeated=0,
            n_classes=self.num_classes,
            n_clusters_per_class=CLUSTERS_PER_CLASS,
            class_sep=self.class_sep,
            random_state=self.seed,
        )
        inputs = torch.tensor(features, dtype=torch.float32)
        targets = torch.tensor(labels, dtype=torch.long)
        positions = stratified_split(targets, {"val": self.val_fraction, "test": self.test_fraction}, self.seed)
        return {split: (inputs[members], targets[members]) for split, members in positions.items()}
