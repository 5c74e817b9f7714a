"""scikit-learn's bundled tabular classification sets (iris, wine, breast cancer), no download."""

from __future__ import annotations

from typing import Any, Literal

import torch
from sklearn import datasets

from .base import ClassificationDataModule, Split
from .splits import check_holdout_fractions, stratified_split

TabularName = Literal["iris", "wine", "breast_cancer"]

# (loader, num_classes, num_features): known without loading, as the CLI reads them after __init__.
TABULAR_SETS: dict[str, tuple[Any, int, int]] = {
    "iris": (datasets.load_iris, 3, 4),
    "wine": (datasets.load_wine, 3, 13),
    "breast_cancer": (datasets.load_breast_cancer, 2, 30),
}


class TabularDataModule(ClassificationDataModule):
    """A bundled tabular set, split seeded and stratified, standardized with training-split statistics.

    Args:
        name: ``"iris"``, ``"wine"`` or ``"breast_cancer"``.
        val_fraction: fraction of each class held out for validation.
        test_fraction: fraction of each class held out for testing.
        **kwargs: :class:`~reglab.datamodules.base.ClassificationDataModule` arguments.

    Example:
        >>> data = TabularDataModule(name="iris", batch_size=8)
        >>> data.num_classes, data.input_shape
        (3, (4,))
        >>> data.setup("fit")
        >>> next(iter(data.val_dataloader()))["input"].shape
        torch.Size([8, 4])
    """

    def __init__(
        self, name: TabularName = "wine", val_fraction: float = 0.15, test_fraction: float = 0.25, **kwargs: Any
    ) -> None:
        if name not in TABULAR_SETS:
            raise ValueError(f"{type(self).__name__}: unknown name {name!r}; use one of {sorted(TABULAR_SETS)}.")
        check_holdout_fractions(type(self).__name__, val_fraction=val_fraction, test_fraction=test_fraction)
        self.name = name
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        _, self.num_classes, num_features = TABULAR_SETS[name]
        self.input_shape = (num_features,)
        super().__init__(**kwargs)

    def _load_splits(self) -> dict[str, Split]:
        load, _, _ = TABULAR_SETS[self.name]
        features, labels = load(return_X_y=True)
        inputs = torch.tensor(features, dtype=torch.float32)
        targets = torch.tensor(labels, dtype=torch.long)
        positions = stratified_split(targets, {"val": self.val_fraction, "test": self.test_fraction}, self.seed)
        train_inputs = inputs[positions["train"]]
        mean, std = train_inputs.mean(dim=0), train_inputs.std(dim=0)
        std[std == 0] = 1.0  # a constant feature stays 0 instead of becoming NaN
        inputs = (inputs - mean) / std
        return {split: (inputs[members], targets[members]) for split, members in positions.items()}
