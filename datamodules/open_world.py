"""The open-world split of metric learning: train on some classes, retrieve among classes never seen."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

from .base import ClassificationDataModule, Split
from .digits import digit_images
from .sampling import MPerClassSampler, ResumableSampler, check_m_per_class
from .splits import check_holdout_fractions, stratified_split


class OpenWorldDigitsDataModule(ClassificationDataModule):
    """The digits split by class, as the deep metric learning benchmarks split CUB or Cars: the
    ``seen_classes`` train the embedding, every image of the other classes is the test set, where
    each one queries all the others (:class:`~reglab.metrics.RecallAtK`). Validation holds out
    ``val_fraction`` of each seen class, so model selection never looks at the unseen classes.
    Labels keep their digit (``num_classes`` stays 10).

    Training batches come from :class:`~reglab.datamodules.sampling.MPerClassSampler` (``m_per_class``
    samples of each of ``batch_size / m_per_class`` seen classes), so miners always find positives;
    ``m_per_class=None`` is the uniform shuffle.

    Args:
        seen_classes: the digits trained on (default 0-4; the test set is 5-9).
        m_per_class: samples per class in a training batch, or ``None``.
        val_fraction: fraction of each seen class held out for validation.
        flatten: inputs of shape ``(64,)`` instead of ``(1, 8, 8)``.
        **kwargs: :class:`~reglab.datamodules.base.ClassificationDataModule` arguments.

    Example:
        >>> data = OpenWorldDigitsDataModule(batch_size=20, m_per_class=4)
        >>> data.setup("fit")
        >>> batch = next(iter(data.train_dataloader()))
        >>> sorted(batch["target"].unique().tolist()), sorted(data.test_dataset.targets.unique().tolist())
        ([0, 1, 2, 3, 4], [5, 6, 7, 8, 9])
    """

    num_classes = 10

    def __init__(self, seen_classes: Sequence[int] = (0, 1, 2, 3, 4), m_per_class: Optional[int] = 4,
                 val_fraction: float = 0.15, flatten: bool = False, **kwargs: Any) -> None:
        name = type(self).__name__
        check_holdout_fractions(name, val_fraction=val_fraction)
        seen = sorted(set(int(c) for c in seen_classes))
        if not seen or seen[0] < 0 or seen[-1] >= self.num_classes or len(seen) == self.num_classes:
            raise ValueError(f"{name}: seen_classes must be some but not all of the digits 0-9, got "
                             f"{list(seen_classes)}. Fix: e.g. seen_classes=[0, 1, 2, 3, 4].")
        batch_size = kwargs.get("batch_size", 64)
        if m_per_class is not None:  # the sampler's checks, at construction rather than at the first epoch
            check_m_per_class(name, batch_size, m_per_class, len(seen))
        self.seen_classes, self.m_per_class, self.val_fraction = seen, m_per_class, val_fraction
        self.input_shape = (64,) if flatten else (1, 8, 8)
        super().__init__(**kwargs)

    def _load_splits(self) -> dict[str, Split]:
        images, targets = digit_images()
        inputs = images.reshape(-1, *self.input_shape)
        seen = sum(targets == c for c in self.seen_classes).bool()
        seen_positions = seen.nonzero().flatten()
        parts = stratified_split(targets[seen_positions], {"val": self.val_fraction}, self.seed)
        splits = {name: seen_positions[part] for name, part in parts.items()}
        splits["test"] = (~seen).nonzero().flatten()
        return {name: (inputs[positions], targets[positions]) for name, positions in splits.items()}

    def _train_sampler(self, *, num_replicas: int, rank: int, seed: int) -> ResumableSampler:
        if self.m_per_class is None:
            return super()._train_sampler(num_replicas=num_replicas, rank=rank, seed=seed)
        return MPerClassSampler(self.train_dataset.targets, self.batch_size, self.m_per_class,
                                num_replicas=num_replicas, rank=rank, seed=seed)
