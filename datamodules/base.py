"""The pieces every reglab DataModule is built from.

* :class:`DictDataset` — samples as dicts (``input``, ``target``, ``index`` and per-sample extras).
* :class:`ResumableSampler` / :class:`ResumableDataLoader` — a shuffled, DDP-sharded training loader
  that Lightning checkpoints and resumes in the middle of an epoch, batch for batch.
* :class:`DictDataModule` — the loaders and dataset properties every reglab DataModule shares.
* :class:`ClassificationDataModule` — loads, validates and corrupts (label noise, long tail) the
  splits a subclass provides.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any, ClassVar, Optional, Protocol, Union

import lightning
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from .label_noise import LabelNoise, apply_label_noise
from .long_tail import LongTail, apply_long_tail
from .sampling import RepeatFactorSampler, ResumableSampler

RESERVED_KEYS = ("input", "target", "index")
REQUIRED_SPLITS = ("train", "val", "test")


class LazyInputs(Protocol):
    """Per-sample inputs produced on access (e.g. decoded image files) instead of held in one tensor.

    Anything with these three methods can stand where an ``(N, *input_shape)`` tensor is expected.
    """

    def __len__(self) -> int: ...

    def __getitem__(self, position: int) -> Tensor: ...

    def subset(self, positions: Tensor) -> LazyInputs:
        """The inputs at ``positions``, in that order, as a new object of the same kind."""
        ...


Inputs = Union[Tensor, LazyInputs]
Split = Union[tuple[Inputs, Tensor], tuple[Inputs, Tensor, dict[str, Tensor]]]


def select_samples(inputs: Inputs, positions: Tensor) -> Inputs:
    """The samples of ``inputs`` at ``positions``, whether ``inputs`` is a tensor or :class:`LazyInputs`."""
    return inputs[positions] if isinstance(inputs, Tensor) else inputs.subset(positions)


def sample_shape(inputs: Inputs) -> tuple[int, ...]:
    """The shape of one sample; for lazy inputs the first sample's (decoding all of them would be too slow)."""
    return tuple(inputs.shape[1:]) if isinstance(inputs, Tensor) else tuple(inputs[0].shape)


class DictDataset(Dataset):
    """A map-style dataset whose samples are dicts: ``input``, ``target``, ``index`` and the extras.

    ``index`` is the sample's position in this dataset, so per-sample state of a technique (target
    buffers, stored predictions) can be a tensor of length ``len(dataset)`` indexed by
    ``batch["index"]``.

    Args:
        inputs: ``(N, ...)`` float tensor, or :class:`LazyInputs` of length N.
        targets: ``(N,)`` long tensor of class labels.
        extras: further per-sample tensors of length N (``clean_target``, ``domain``, ``task``, ...).

    Example:
        >>> import torch
        >>> dataset = DictDataset(torch.zeros(4, 2), torch.tensor([0, 1, 0, 1]), {"domain": torch.ones(4)})
        >>> sorted(dataset[2].items(), key=lambda item: item[0])
        [('domain', tensor(1.)), ('index', 2), ('input', tensor([0., 0.])), ('target', tensor(0))]
        >>> dataset.keys
        ('input', 'target', 'index', 'domain')
    """

    def __init__(self, inputs: Inputs, targets: Tensor, extras: Optional[dict[str, Tensor]] = None) -> None:
        self.inputs = inputs
        self.targets = targets
        self.extras = dict(extras or {})
        clashing = sorted(set(self.extras) & set(RESERVED_KEYS))
        if clashing:
            raise ValueError(f"DictDataset: extras may not be named {clashing}; those keys are always present.")
        lengths = {"inputs": len(inputs), "targets": len(targets), **{k: len(v) for k, v in self.extras.items()}}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"DictDataset: every per-sample field needs the same length, got {lengths}.")

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, position: int) -> dict[str, Any]:
        # A plain int collates to a long tensor, which is what techniques index their buffers with.
        sample = {"input": self.inputs[position], "target": self.targets[position], "index": position}
        sample.update({key: values[position] for key, values in self.extras.items()})
        return sample

    @property
    def keys(self) -> tuple[str, ...]:
        """The keys of every sample (and so of every collated batch)."""
        return (*RESERVED_KEYS, *self.extras)


class _DeferredIterator(Iterator[Any]):
    """An iterator that calls ``make_iterator`` on its first ``next()`` and then delegates to the result."""

    def __init__(self, make_iterator: Callable[[], Iterator[Any]]) -> None:
        self._make_iterator = make_iterator
        self._iterator: Optional[Iterator[Any]] = None

    def __next__(self) -> Any:
        if self._iterator is None:
            self._iterator = self._make_iterator()
        return next(self._iterator)


class ResumableDataLoader(DataLoader):
    """A training DataLoader that Lightning checkpoints and resumes mid-epoch, batch for batch.

    Lightning's fit loop stores ``state_dict()`` of every loader that has one in the checkpoint and
    calls ``load_state_dict()`` when it restarts from it, just before creating the first iterator.
    The state is *read from the trainer*, not counted here: loaders run ahead of training (worker
    prefetching, Lightning's own prefetch for unsized loaders), so the batches yielded are not the
    batches trained on. ``progress_fn`` returns ``(epoch, batches whose step is done in that epoch)``;
    :meth:`DictDataModule.fit_progress` is the one for Lightning.

    The DataLoader gets a seeded ``generator`` (one is made from the sampler's seed if none is
    given): creating an iterator draws a base seed from it, and drawing from the global RNG instead
    would make a resumed run's model RNG stream differ from the uninterrupted one.

    Args:
        dataset: the training dataset.
        batch_size: samples per batch (the last batch of an epoch may be smaller).
        sampler: the :class:`ResumableSampler` over ``dataset``.
        progress_fn: returns ``(epoch, batches_done)``; required for :meth:`state_dict`.
        generator: seeded generator for the DataLoader's base seed.
        **dataloader_kwargs: further :class:`~torch.utils.data.DataLoader` arguments (``num_workers``, ...).

    Example:
        >>> import torch
        >>> dataset = DictDataset(torch.zeros(10, 2), torch.zeros(10, dtype=torch.long))
        >>> loader = ResumableDataLoader(dataset, 4, sampler=ResumableSampler(10), progress_fn=lambda: (0, 1))
        >>> loader.state_dict()
        {'epoch': 0, 'batches_done': 1}
        >>> loader.load_state_dict({'epoch': 0, 'batches_done': 1})
        >>> [len(batch["index"]) for batch in loader]   # the epoch resumes after its first batch
        [4, 2]
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        *,
        sampler: ResumableSampler,
        progress_fn: Optional[Callable[[], tuple[int, int]]] = None,
        generator: Optional[torch.Generator] = None,
        **dataloader_kwargs: Any,
    ) -> None:
        if generator is None:
            generator = torch.Generator().manual_seed(sampler.seed)
        super().__init__(dataset, batch_size=batch_size, sampler=sampler, generator=generator, **dataloader_kwargs)
        self.progress_fn = progress_fn

    def __iter__(self) -> Iterator[Any]:
        # Lightning creates the first iterator of a run (in fit_loop.setup_data) before it calls
        # set_epoch for that epoch, and worker processes start drawing sampler indices as soon as the
        # iterator exists. Deferring creation to the first next() lets that epoch, and its resume
        # point, take effect; otherwise a resumed run with num_workers > 0 replays the wrong epoch.
        return _DeferredIterator(super().__iter__)

    def state_dict(self) -> dict[str, int]:
        """``{"epoch", "batches_done"}`` as reported by ``progress_fn`` now."""
        if self.progress_fn is None:
            raise RuntimeError(
                "ResumableDataLoader.state_dict needs progress_fn to know how many batches were trained on;"
                " build the loader with progress_fn (DictDataModule.train_dataloader does)."
            )
        epoch, batches_done = self.progress_fn()
        return {"epoch": epoch, "batches_done": batches_done}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        """Makes the next iteration of the saved epoch start after its ``batches_done`` batches."""
        if not isinstance(self.sampler, ResumableSampler):
            raise TypeError(
                f"ResumableDataLoader: resuming needs a ResumableSampler, but the sampler is"
                f" {type(self.sampler).__name__} (was it replaced, e.g. by Trainer(overfit_batches=...)?)."
            )
        # min(): the last batch of an epoch may be smaller than batch_size.
        samples_done = min(state_dict["batches_done"] * self.batch_size, len(self.sampler))
        self.sampler.resume(state_dict["epoch"], samples_done)


class DictDataModule(lightning.LightningDataModule):
    """The loaders and dataset properties every reglab DataModule shares, whatever its samples are.

    A subclass's :meth:`setup` sets ``train_dataset``, ``val_dataset``, ``test_dataset`` (and
    optionally ``predict_dataset``) to :class:`DictDataset`\\ s; this class builds the loaders from
    them: a shuffled, rank-sharded training loader that resumes mid-epoch batch for batch
    (:class:`ResumableDataLoader`, progress read by :meth:`fit_progress`) and ordered evaluation
    loaders, each with its own seeded generator so that no loader draws from the global RNG.
    :class:`ClassificationDataModule` (class-index targets) and
    :class:`~reglab.datamodules.scenes.DigitScenesDataModule` (dense masks) both build on it.

    Args:
        batch_size: training batch size per rank.
        num_workers: DataLoader worker processes.
        seed: seed of the training shuffle (and of a subclass's splits).
        eval_batch_size: batch size of the validation/test/predict loaders (default ``batch_size``).

    Attributes:
        train_dataset, val_dataset, test_dataset, predict_dataset: :class:`DictDataset`\\ s after ``setup``.
        num_train_samples: training set size after ``setup``.
    """

    def __init__(
        self, batch_size: int = 64, num_workers: int = 0, seed: int = 0, eval_batch_size: Optional[int] = None
    ) -> None:
        super().__init__()
        name = type(self).__name__
        for arg, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
            if value is not None and value < 1:
                raise ValueError(f"{name}: {arg} must be at least 1, got {value}.")
        if num_workers < 0:
            raise ValueError(f"{name}: num_workers must be ≥ 0, got {num_workers}.")
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.train_dataset: Optional[DictDataset] = None
        self.val_dataset: Optional[DictDataset] = None
        self.test_dataset: Optional[DictDataset] = None
        self.predict_dataset: Optional[DictDataset] = None
        self._train_repeat_factors: Optional[Tensor] = None

    @property
    def num_train_samples(self) -> int:
        """Size of the training set (after any subsampling such as a long tail); needs :meth:`setup`."""
        return len(self._require_setup().train_dataset)

    @property
    def batch_keys(self) -> frozenset[str]:
        """Keys every training batch carries; needs :meth:`setup` (techniques check it in their own ``setup``)."""
        return frozenset(self._require_setup().train_dataset.keys)

    def _require_setup(self) -> DictDataModule:
        if self.train_dataset is None:
            raise RuntimeError(f"{type(self).__name__}: call setup() before asking for the datasets' properties.")
        return self

    def fit_progress(self) -> tuple[int, int]:
        """``(current epoch, batches of it whose optimizer step is done)`` of the attached trainer.

        ``batch_progress.current.processed`` is the count to save: ModelCheckpoint saves mid-epoch in
        ``on_train_batch_end``, after ``processed`` but before ``completed`` is incremented for the
        batch just trained on; after validation or at epoch end both are equal.
        """
        if self.trainer is None:
            raise RuntimeError(f"{type(self).__name__}.fit_progress: no trainer is attached to this DataModule.")
        return self.trainer.current_epoch, self.trainer.fit_loop.epoch_loop.batch_progress.current.processed

    @property
    def train_instance_counts(self) -> Tensor:
        """``(N, C)`` instances of each class in each training sample (repeat factor sampling reads it):
        the dataset's ``instance_counts`` extra where it has one (segmentation scenes), else one object
        per sample, the one-hot of its (possibly noisy) class label."""
        dataset = self._require_setup().train_dataset
        if "instance_counts" in dataset.extras:
            return dataset.extras["instance_counts"]
        if dataset.targets.ndim != 1 or dataset.targets.is_floating_point() or not hasattr(self, "num_classes"):
            raise ValueError(
                f"{type(self).__name__}: cannot tell the instances per class of its training samples (targets of"
                f" shape {tuple(dataset.targets.shape)} are not class labels and there is no `instance_counts`"
                " extra); give the training DictDataset an (N, C) `instance_counts` extra."
            )
        return torch.nn.functional.one_hot(dataset.targets, self.num_classes)

    def set_train_repeat_factors(self, factors: Optional[Tensor]) -> None:
        """Makes the training loader built next draw sample ``i`` ``factors[i]`` times per epoch on
        average (:class:`~reglab.datamodules.sampling.RepeatFactorSampler`); ``None`` restores the
        uniform shuffle. Techniques call it in their ``setup``, which Lightning runs after this
        DataModule's ``setup`` and before it asks for ``train_dataloader``."""
        if factors is not None and tuple(factors.shape) != (self.num_train_samples,):
            raise ValueError(
                f"{type(self).__name__}.set_train_repeat_factors: got {tuple(factors.shape)} factors for"
                f" {self.num_train_samples} training samples; pass one factor per training sample."
            )
        self._train_repeat_factors = factors

    def train_dataloader(self) -> ResumableDataLoader:
        """Shuffled (or repeat-factor sampled), sharded over the trainer's ranks, and resumable mid-epoch."""
        train_dataset = self._require_setup().train_dataset
        ranks = dict(num_replicas=self.trainer.world_size if self.trainer else 1,
                     rank=self.trainer.global_rank if self.trainer else 0, seed=self.seed)
        return ResumableDataLoader(
            train_dataset,
            self.batch_size,
            sampler=self._train_sampler(**ranks),
            progress_fn=self.fit_progress,
            generator=torch.Generator().manual_seed(self.seed),
            num_workers=self.num_workers,
        )

    def _train_sampler(self, *, num_replicas: int, rank: int, seed: int) -> ResumableSampler:
        """The training loader's sampler: the uniform shuffle, or repeat factor sampling once
        :meth:`set_train_repeat_factors` was called. A subclass that orders its batches otherwise
        (:class:`~reglab.datamodules.domains.DomainDigitsDataModule`: one share per domain) overrides it."""
        if self._train_repeat_factors is None:
            return ResumableSampler(self.train_dataset, shuffle=True, num_replicas=num_replicas, rank=rank, seed=seed)
        return RepeatFactorSampler(self._train_repeat_factors, num_replicas=num_replicas, rank=rank, seed=seed)

    def val_dataloader(self) -> DataLoader:
        return self._eval_dataloader(self._require_setup().val_dataset)

    def test_dataloader(self) -> DataLoader:
        return self._eval_dataloader(self._require_setup().test_dataset)

    def predict_dataloader(self) -> DataLoader:
        """The ``predict`` split if the dataset has one, else the test split."""
        self._require_setup()
        return self._eval_dataloader(self.test_dataset if self.predict_dataset is None else self.predict_dataset)

    def _eval_dataloader(self, dataset: DictDataset) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.eval_batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            generator=torch.Generator().manual_seed(self.seed),
        )


class ClassificationDataModule(DictDataModule):
    """Base of reglab's classification DataModules: splits in, validated dict batches out.

    A subclass sets ``num_classes`` and ``input_shape`` (class attributes, or instance attributes set
    *before* calling ``super().__init__`` — they must be known without loading data, because the CLI
    instantiates the DataModule just to read them, and the label noise is checked against
    ``num_classes`` here) and implements :meth:`_load_splits`. It may set
    ``default_asymmetric_map``, the dataset's standard map for ``LabelNoise(kind="asymmetric")``.

    :meth:`setup` loads the splits once, validates them, then applies ``long_tail`` and afterwards
    ``label_noise`` to the training split only; with label noise every training batch also carries
    ``clean_target``, the labels before noise (for measuring only). Validation and test splits stay
    clean.

    Args:
        batch_size: training batch size per rank.
        num_workers: DataLoader worker processes.
        seed: seed of the splits and of the training shuffle.
        label_noise: noise to apply to training labels, or ``None``.
        long_tail: class imbalance to apply to the training split, or ``None``.
        eval_batch_size: batch size of the validation/test/predict loaders (default ``batch_size``).

    Attributes:
        num_classes, input_shape: known right after ``__init__``.
        train_dataset, val_dataset, test_dataset, predict_dataset: :class:`DictDataset`\\ s after ``setup``.
        num_train_samples: training set size after ``setup`` (after the long tail).

    Example:
        >>> import torch
        >>> class Toy(ClassificationDataModule):
        ...     num_classes, input_shape = 2, (3,)
        ...     def _load_splits(self):
        ...         split = (torch.randn(8, 3), torch.tensor([0, 1] * 4))
        ...         return {"train": split, "val": split, "test": split}
        >>> data = Toy(batch_size=4, label_noise=LabelNoise(rate=0.5))
        >>> data.setup("fit")
        >>> sorted(data.batch_keys)
        ['clean_target', 'index', 'input', 'target']
        >>> batch = next(iter(data.train_dataloader()))
        >>> batch["input"].shape, batch["index"].dtype
        (torch.Size([4, 3]), torch.int64)
    """

    num_classes: int
    input_shape: tuple[int, ...]
    default_asymmetric_map: ClassVar[Optional[dict[int, int]]] = None

    def __init__(
        self,
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
        label_noise: Optional[LabelNoise] = None,
        long_tail: Optional[LongTail] = None,
        eval_batch_size: Optional[int] = None,
    ) -> None:
        if not (hasattr(self, "num_classes") and hasattr(self, "input_shape")):
            raise TypeError(
                f"{type(self).__name__} must set num_classes and input_shape before calling ClassificationDataModule.__init__."
            )
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed, eval_batch_size=eval_batch_size)
        self.label_noise = self._resolve_label_noise(label_noise)
        self.long_tail = long_tail

    def _resolve_label_noise(self, label_noise: Optional[LabelNoise]) -> Optional[LabelNoise]:
        if label_noise is None:
            return None
        if label_noise.kind == "asymmetric" and label_noise.class_map is None:
            if self.default_asymmetric_map is None:
                raise ValueError(
                    f"{type(self).__name__}: asymmetric label noise needs a class_map (true class → noisy class)"
                    " and this dataset has no standard one; set label_noise.class_map."
                )
            label_noise = replace(label_noise, class_map=dict(self.default_asymmetric_map))
        label_noise.check_num_classes(self.num_classes)
        return label_noise

    def _load_splits(self) -> dict[str, Split]:
        """Returns ``{"train", "val", "test"[, "predict"]: (inputs, targets[, extras])}``, uncorrupted.

        ``inputs`` is an ``(N, *input_shape)`` float tensor or :class:`LazyInputs`, ``targets`` an
        ``(N,)`` integer tensor, ``extras`` a dict of further per-sample tensors.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement _load_splits().")

    def setup(self, stage: Optional[str] = None) -> None:
        """Loads, validates and builds all datasets; later calls do nothing."""
        if self.train_dataset is not None:
            return
        splits = self._load_splits()
        missing = [name for name in REQUIRED_SPLITS if name not in splits]
        if missing:
            raise ValueError(
                f"{type(self).__name__}._load_splits returned no {missing} split; it must return {REQUIRED_SPLITS}."
            )
        checked = {name: self._checked_split(name, split) for name, split in splits.items()}
        self.train_dataset = self._corrupted_train_dataset(*checked.pop("train"))
        self.val_dataset, self.test_dataset = DictDataset(*checked["val"]), DictDataset(*checked["test"])
        if "predict" in checked:
            self.predict_dataset = DictDataset(*checked["predict"])

    def _checked_split(self, name: str, split: Split) -> tuple[Inputs, Tensor, dict[str, Tensor]]:
        """Validates one split and returns it as ``(inputs, long targets, extras)``."""
        where = f"{type(self).__name__}: the {name!r} split"
        if not isinstance(split, tuple) or len(split) not in (2, 3):
            raise ValueError(f"{where} must be a tuple (inputs, targets) or (inputs, targets, extras).")
        inputs, targets = split[0], split[1]
        extras = split[2] if len(split) == 3 else {}
        if targets.ndim != 1 or targets.is_floating_point() or targets.is_complex():
            raise ValueError(
                f"{where} needs 1-D integer targets, got dtype {targets.dtype} and shape {tuple(targets.shape)}."
            )
        targets = targets.long()
        if len(targets) == 0:
            raise ValueError(
                f"{where} is empty; check the data source and the split fractions so that every split gets samples."
            )
        lengths = {"inputs": len(inputs), "targets": len(targets), **{k: len(v) for k, v in extras.items()}}
        if len(set(lengths.values())) > 1:
            raise ValueError(
                f"{where} has inputs and targets of different length {lengths}; give every sample one target."
            )
        bad_labels = targets[(targets < 0) | (targets >= self.num_classes)].unique()
        if len(bad_labels):
            raise ValueError(
                f"{where} has labels outside [0, {self.num_classes}), e.g. {bad_labels[:5].tolist()};"
                f" map labels to 0..{self.num_classes - 1} or fix num_classes."
            )
        if isinstance(inputs, Tensor) and inputs.is_floating_point():
            bad_samples = (~torch.isfinite(inputs.reshape(len(inputs), -1))).any(1).nonzero()
            if len(bad_samples):
                raise ValueError(
                    f"{where} has NaN or infinite inputs in {len(bad_samples)} samples, e.g. at positions"
                    f" {bad_samples[:5, 0].tolist()}; drop or impute those samples before training."
                )
        if sample_shape(inputs) != tuple(self.input_shape):
            raise ValueError(
                f"{where} has inputs of per-sample shape {sample_shape(inputs)}, but input_shape is"
                f" {tuple(self.input_shape)}; reshape the inputs or fix input_shape."
            )
        return inputs, targets, extras

    def _corrupted_train_dataset(self, inputs: Inputs, targets: Tensor, extras: dict[str, Tensor]) -> DictDataset:
        if self.long_tail is not None:
            kept = apply_long_tail(targets, self.num_classes, self.long_tail)
            inputs, targets = select_samples(inputs, kept), targets[kept]
            extras = {key: values[kept] for key, values in extras.items()}
        if self.label_noise is not None:
            # A dataset that ships its own clean labels (real noisy labels) keeps them as the truth.
            extras = {**extras, "clean_target": extras.get("clean_target", targets)}
            targets = apply_label_noise(targets, self.num_classes, self.label_noise)
        return DictDataset(inputs, targets, extras)
