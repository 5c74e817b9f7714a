"""The category-discovery scenario: labelled known classes and an unlabelled pool that holds novel
classes (NCD) or known and novel classes mixed (GCD), on the embedded digits and tabular sets."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, Optional

import torch
from sklearn import datasets
from torch import Tensor

from reglab.nn.contrastive import augmented_view

from .base import DictDataModule, DictDataset
from .digits import digit_images
from .sampling import RepeatFactorSampler, ResumableSampler
from .splits import check_holdout_fractions, stratified_split
from .tabular import TABULAR_SETS
from .tasks import TaskSequenceDataModule, TaskSubset

Source = Literal["digits", "iris", "wine", "breast_cancer", "blobs"]
Mode = Literal["ncd", "gcd"]
#: the class count of each source, known without loading it (the CLI reads the shapes after __init__)
SOURCE_CLASSES = {"digits": 10, **{name: classes for name, (_, classes, _) in TABULAR_SETS.items()}}
#: the GCD and NCD conventions for the labelled share of a known class's training samples:
#: GCD labels half (``prop_train_labels`` 0.5 in the GCD and SimGCD code), NCD all of them
DEFAULT_LABELLED_FRACTION = {"gcd": 0.5, "ncd": 1.0}


class DiscoveryDataModule(DictDataModule):
    """Known classes with some labels, and an unlabelled pool in which new classes are to be found.

    The source's samples are split seeded and stratified into train / val / test over all the
    classes used. Of each known class's *training* samples a ``labelled_fraction`` is labelled;
    the unlabelled pool holds every training sample of the novel classes and, with ``mode="gcd"``,
    the known classes' unlabelled rest too (``mode="ncd"``: the pool is novel classes only, and a
    known class's unlabelled rest, if ``labelled_fraction < 1``, is not used). Classes are
    renumbered known first: index ``i < num_known_classes`` is ``known_classes[i]``, the others
    ``novel_classes`` in order (``classes`` lists the source class of each index), which is how
    the GCD code numbers them and what :class:`~reglab.metrics.ClusteringAccuracy` takes as its
    old classes.

    Batches (dicts) carry ``input``, ``target`` (the class of a labelled sample, else ``-1``),
    ``labelled`` (bool), ``true_target`` (every sample's class: for evaluation only, a loss must
    not read it), ``pool`` (the sample is in the unlabelled pool) and ``index``. Training batches
    also carry two augmented views ``view1`` and ``view2`` (SimGCD trains on two views): digits get
    :func:`reglab.nn.contrastive.augmented_view`'s rotation, shift and pixel noise, tabular rows
    Gaussian noise of ``tabular_noise`` standard deviations (the features are standardized). The
    views are drawn on the device after transfer from a generator seeded with ``(seed, batch
    number, rank)``, so a resumed run draws the same ones. With ``balance_batches`` the training
    sampler gives labelled and unlabelled samples equal shares of an epoch (SimGCD's weighted
    sampler; here repeat factors ≥ 1, so an epoch is twice the larger group).

    Validation and test hold the unlabelled pool (``pool`` true: the transductive score GCD
    reports) followed by the held-out val / test split (``pool`` false: the inductive score); in
    them ``target`` is the true class for known classes and ``-1`` for novel ones.

    Sources: ``digits`` (scikit-learn's 8x8 digits, images or with ``flatten`` 64 features),
    ``iris``, ``wine``, ``breast_cancer`` (standardized with training statistics) and ``blobs``
    (``make_blobs`` seeded with ``seed``: ``generated_classes`` Gaussian classes of
    ``generated_samples`` rows in total, ``generated_features`` features, ``cluster_std``).

    Args:
        source: where the samples come from (above).
        known_classes: source classes that are known (default: the first half of the classes).
        novel_classes: source classes to discover (default: every class not known).
        mode: ``"gcd"`` or ``"ncd"`` (above).
        labelled_fraction: share of each known class's training samples that is labelled
            (default: 0.5 for GCD, 1.0 for NCD).
        flatten: digits as ``(64,)`` rows instead of ``(1, 8, 8)`` images.
        val_fraction, test_fraction: shares of each class held out.
        views: give training batches ``view1`` / ``view2``.
        tabular_noise: standard deviation of a tabular view's noise (the digits' views use
            ``augmented_view``'s defaults).
        balance_batches: equal shares of labelled and unlabelled samples per epoch.
        generated_classes, generated_features, generated_samples, cluster_std: the ``blobs`` source.
        batch_size, num_workers, seed, eval_batch_size: :class:`~reglab.datamodules.base.DictDataModule`'s.

    Example:
        >>> data = DiscoveryDataModule("digits", known_classes=[0, 1, 2, 3, 4], mode="gcd", batch_size=16)
        >>> data.num_classes, data.num_known_classes, data.input_shape
        (10, 5, (1, 8, 8))
        >>> data.setup("fit")
        >>> batch = next(iter(data.val_dataloader()))
        >>> sorted(batch)
        ['index', 'input', 'labelled', 'pool', 'target', 'true_target']
        >>> bool((data.train_dataset.targets[~data.train_dataset.extras["labelled"]] == -1).all())
        True
    """

    def __init__(
        self,
        source: Source = "digits",
        known_classes: Optional[Sequence[int]] = None,
        novel_classes: Optional[Sequence[int]] = None,
        mode: Mode = "gcd",
        labelled_fraction: Optional[float] = None,
        flatten: bool = False,
        val_fraction: float = 0.15,
        test_fraction: float = 0.25,
        views: bool = True,
        tabular_noise: float = 0.1,
        balance_batches: bool = True,
        generated_classes: int = 6,
        generated_features: int = 8,
        generated_samples: int = 900,
        cluster_std: float = 4.0,
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
        eval_batch_size: Optional[int] = None,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed, eval_batch_size=eval_batch_size)
        name = type(self).__name__
        if source not in (*SOURCE_CLASSES, "blobs"):
            raise ValueError(f"{name}: unknown source {source!r}. Fix: use one of {[*SOURCE_CLASSES, 'blobs']}.")
        if mode not in DEFAULT_LABELLED_FRACTION:
            raise ValueError(f"{name}: mode {mode!r} is neither 'gcd' (pool of known and novel classes) nor 'ncd' "
                             "(pool of novel classes only). Fix: pick one.")
        if source == "blobs" and (generated_classes < 2 or generated_features < 1 or generated_samples < 1):
            raise ValueError(f"{name}: the blobs source needs generated_classes ≥ 2, generated_features ≥ 1 and "
                             "generated_samples ≥ 1. Fix: raise them.")
        check_holdout_fractions(name, val_fraction=val_fraction, test_fraction=test_fraction)
        total = generated_classes if source == "blobs" else SOURCE_CLASSES[source]
        known = list(range(total // 2)) if known_classes is None else [int(c) for c in known_classes]
        novel = [c for c in range(total) if c not in known] if novel_classes is None else [int(c) for c in novel_classes]
        for what, classes in (("known_classes", known), ("novel_classes", novel)):
            if not classes:
                raise ValueError(f"{name}: {what} is empty. Fix: name at least one class of the {total} of {source!r}.")
            if len(set(classes)) != len(classes) or any(not 0 <= c < total for c in classes):
                raise ValueError(f"{name}: {what} {classes} repeats a class or names one outside 0..{total - 1} of "
                                 f"{source!r}. Fix: list distinct classes of the source.")
        if set(known) & set(novel):
            raise ValueError(f"{name}: classes {sorted(set(known) & set(novel))} are both known and novel. Fix: put "
                             "each class in one list.")
        fraction = DEFAULT_LABELLED_FRACTION[mode] if labelled_fraction is None else labelled_fraction
        if not 0.0 < fraction <= 1.0 or (mode == "gcd" and fraction == 1.0):
            raise ValueError(f"{name}: labelled_fraction {fraction} must lie in (0, 1] (and below 1 for GCD, whose "
                             "pool needs unlabelled known-class samples). Fix: e.g. 0.5.")
        if tabular_noise < 0:
            raise ValueError(f"{name}: tabular_noise must be ≥ 0, got {tabular_noise}.")
        self.source, self.mode, self.labelled_fraction, self.flatten = source, mode, fraction, flatten
        self.known_classes, self.novel_classes = known, novel
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.views, self.tabular_noise, self.balance_batches = views, tabular_noise, balance_batches
        self.generated = {"n_samples": generated_samples, "centers": generated_classes,
                          "n_features": generated_features, "cluster_std": cluster_std}
        self.num_known_classes = len(known)
        self.num_classes = len(known) + len(novel)
        self.classes = known + novel
        if source == "digits":
            self.input_shape: tuple[int, ...] = (64,) if flatten else (1, 8, 8)
        else:
            self.input_shape = (generated_features if source == "blobs" else TABULAR_SETS[source][2],)

    @property
    def is_image(self) -> bool:
        """Whether the samples are digit images (flat or not): their views are image augmentations."""
        return self.source == "digits"

    @property
    def batch_keys(self) -> frozenset[str]:
        return super().batch_keys | ({"view1", "view2"} if self.views else set())

    def _load_source(self) -> tuple[Tensor, Tensor]:
        if self.source == "digits":
            images, labels = digit_images()
            return images.reshape(-1, *self.input_shape), labels
        if self.source == "blobs":
            features, labels = datasets.make_blobs(**self.generated, random_state=self.seed)
        else:
            features, labels = TABULAR_SETS[self.source][0](return_X_y=True)
        return torch.tensor(features, dtype=torch.float32), torch.tensor(labels, dtype=torch.long)

    def setup(self, stage: Optional[str] = None) -> None:
        """Splits the source once (later calls do nothing); a class left without labelled or
        held-out samples is refused with the numbers."""
        if self.train_dataset is not None:
            return
        inputs, source_labels = self._load_source()
        renumber = torch.full((int(source_labels.max()) + 1,), -1, dtype=torch.long)
        renumber[torch.tensor(self.classes)] = torch.arange(self.num_classes)
        used = renumber[source_labels] >= 0
        inputs, labels = inputs[used], renumber[source_labels[used]]
        parts = stratified_split(labels, {"val": self.val_fraction, "test": self.test_fraction}, self.seed)
        if not self.is_image:  # standardize with the training split's statistics (labelled or not: no labels used)
            mean, std = inputs[parts["train"]].mean(0), inputs[parts["train"]].std(0)
            inputs = (inputs - mean) / std.masked_fill(std == 0, 1.0)
        train = parts["train"]
        labelled = self._labelled_positions(labels, train)
        is_labelled = torch.zeros(len(labels), dtype=torch.bool)
        is_labelled[labelled] = True
        in_train = torch.zeros(len(labels), dtype=torch.bool)
        in_train[train] = True
        known = labels < self.num_known_classes
        in_pool = in_train & ~is_labelled & (~known | torch.tensor(self.mode == "gcd"))
        pool = train[in_pool[train]]
        for split in ("val", "test"):
            missing = sorted(set(range(self.num_classes)) - set(labels[parts[split]].tolist()))
            if missing:
                raise ValueError(f"{type(self).__name__}: the {split} split has no sample of classes {missing}. "
                                 f"Fix: raise {split}_fraction or use a source with more samples per class.")
        train = train[(is_labelled | in_pool)[train]]
        self.train_dataset = self._dataset(inputs, labels, train, is_labelled, in_pool, training=True)
        self.pool_dataset = self._dataset(inputs, labels, pool, is_labelled, in_pool)
        self.val_dataset = self._dataset(inputs, labels, torch.cat([pool, parts["val"]]), is_labelled, in_pool)
        self.test_dataset = self._dataset(inputs, labels, torch.cat([pool, parts["test"]]), is_labelled, in_pool)

    def _labelled_positions(self, labels: Tensor, train: Tensor) -> Tensor:
        """The seeded ``labelled_fraction`` of each known class's training samples."""
        generator = torch.Generator().manual_seed(self.seed + 1)
        chosen = []
        for cls in range(self.num_known_classes):
            members = train[labels[train] == cls]
            count = round(self.labelled_fraction * len(members))
            if count == 0 or (self.mode == "gcd" and count == len(members)):
                raise ValueError(
                    f"{type(self).__name__}: known class {self.classes[cls]} has {len(members)} training samples, so "
                    f"labelled_fraction {self.labelled_fraction} labels {count} of them. Fix: choose a fraction that "
                    "labels at least one" + (" and leaves at least one unlabelled (GCD)." if self.mode == "gcd" else "."))
            chosen.append(members[torch.randperm(len(members), generator=generator)[:count]])
        return torch.cat(chosen)

    def _dataset(self, inputs: Tensor, labels: Tensor, positions: Tensor, is_labelled: Tensor, in_pool: Tensor,
                 training: bool = False) -> DictDataset:
        true, labelled = labels[positions], is_labelled[positions]
        if training:  # the labelled samples' classes only
            target = torch.where(labelled, true, -1)
        else:  # evaluation: the known classes' labels (a loss on the known classes), the novel ones hidden
            target, labelled = torch.where(true < self.num_known_classes, true, -1), torch.zeros_like(labelled)
        return DictDataset(inputs[positions], target, {"labelled": labelled, "true_target": true,
                                                        "pool": in_pool[positions]})

    def _train_sampler(self, *, num_replicas: int, rank: int, seed: int) -> ResumableSampler:
        if self._train_repeat_factors is not None or not self.balance_batches:
            return super()._train_sampler(num_replicas=num_replicas, rank=rank, seed=seed)
        labelled = self.train_dataset.extras["labelled"]
        counts = torch.stack([(~labelled).sum(), labelled.sum()]).double()
        if counts.min() == 0:
            return super()._train_sampler(num_replicas=num_replicas, rank=rank, seed=seed)
        # each group's factor brings it to the larger group's size: equal shares, factors ≥ 1
        factors = (counts.max() / counts)[labelled.long()]
        return RepeatFactorSampler(factors, num_replicas=num_replicas, rank=rank, seed=seed)

    def on_after_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, Any]:
        return self.with_views(batch, self.trainer)

    def with_views(self, batch: dict[str, Any], trainer: Optional[Any]) -> dict[str, Any]:
        """A training batch with its two views (numbered by ``trainer``'s batch count and rank);
        other batches as they are."""
        if not self.views or trainer is None or not trainer.training:
            return batch
        number = trainer.fit_loop.epoch_loop.batch_progress.total.ready * trainer.world_size + trainer.global_rank
        return {**batch, **self.make_views(batch["input"], number)}

    def make_views(self, inputs: Tensor, number: int) -> dict[str, Tensor]:
        """``{"view1", "view2"}`` of a batch of inputs, drawn from ``(seed, number)`` alone."""
        if self.is_image:
            return {f"view{k + 1}": augmented_view(inputs, 2 * number + k, self.seed) for k in (0, 1)}
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + number)
        noise = torch.randn((2, *inputs.shape), generator=generator).to(inputs.device, inputs.dtype)
        return {"view1": inputs + self.tabular_noise * noise[0], "view2": inputs + self.tabular_noise * noise[1]}


class ContinualDiscoveryDataModule(TaskSequenceDataModule):
    """Continual generalized category discovery (C-GCD, the setting of Happy, Ma et al. NeurIPS
    2024) as a task sequence for :mod:`reglab.continual`'s runner.

    Stage 0 (task 0) is ``base``'s labelled known-class samples (the "offline" session: labels
    only, no pool). Each later stage ``s = 1..num_stages`` is an *unlabelled* pool of the stage's
    new classes (the novel classes of ``base``, in order, split evenly over the stages) mixed with
    classes seen before: a new class puts ``new_share`` of its training samples in its own stage
    and spreads the rest over the later stages (the code's "seen novel" samples); the known
    classes' unlabelled samples (``1 - labelled_fraction`` of ``base``) are spread over all stages.
    Each training sample belongs to one stage (the setting keeps no samples of past stages), drawn
    with ``base.seed``. Validation shows the stage's pool and the held-out val samples of the
    classes seen so far (for the module's clustering metrics); ``task_split("test", t)`` is the
    held-out test samples of stage t's classes with their true classes as ``target`` (the runner
    scores it through the module's Hungarian ``align_predictions``).

    Scaled down from the code's CIFAR-100 setting (50 known classes with 80 % labelled, 5 stages of
    10 new classes, 400 samples per new class in its stage): ``base`` sets the classes and the
    labelled share (e.g. 0.8 as the code's ``prop_train_labels``); ``new_share`` 0.8 is 400 of 500.

    Args:
        base: a :class:`DiscoveryDataModule` with ``mode="gcd"`` (its known classes are stage 0's).
        num_stages: the unlabelled stages after stage 0.
        new_share: share of a new class's training samples in its own stage.

    Example:
        >>> base = DiscoveryDataModule("digits", known_classes=[0, 1, 2, 3], labelled_fraction=0.8, flatten=True)
        >>> data = ContinualDiscoveryDataModule(base, num_stages=3)
        >>> data.tasks
        [[0, 1, 2, 3], [4, 5], [6, 7], [8, 9]]
        >>> data.setup("fit")
        >>> data.set_task(1)
        >>> batch = next(iter(data.train_dataloader()))
        >>> bool(batch["labelled"].any()), sorted(set(batch["true_target"].tolist())) <= list(range(6))
        (False, True)
    """

    def __init__(self, base: DiscoveryDataModule, num_stages: int = 3, new_share: float = 0.8) -> None:
        name = type(self).__name__
        if not isinstance(base, DiscoveryDataModule) or base.mode != "gcd":
            raise ValueError(f"{name}: base must be a DiscoveryDataModule with mode='gcd' (a pool of old and new "
                             "classes). Fix: pass one.")
        novel = base.num_classes - base.num_known_classes
        if num_stages < 1 or novel % num_stages:
            raise ValueError(f"{name}: {novel} novel classes do not split evenly into num_stages={num_stages}. "
                             "Fix: choose a divisor of the novel class count.")
        if not 0.0 < new_share <= 1.0:
            raise ValueError(f"{name}: new_share {new_share} must lie in (0, 1]. Fix: e.g. the code's 0.8.")
        super().__init__(base, num_tasks=num_stages + 1, scenario="class", shuffle_classes=False,
                         first_task_classes=base.num_known_classes)
        self.num_known_classes, self.new_share = base.num_known_classes, new_share
        self.stage_of: Optional[Tensor] = None  # the stage of each of base's training samples
        self.heldout: dict[str, DictDataset] = {}

    @property
    def num_stages(self) -> int:
        return self.num_tasks - 1

    def setup(self, stage: Optional[str] = None) -> None:
        self.base.setup(stage)
        if self.stage_of is None:
            self.stage_of = self._stages()
            self.heldout = {split: self._heldout(split) for split in ("val", "test")}
        if self.train_dataset is None:
            self.set_task(self.task)

    def _stages(self) -> Tensor:
        train = self.base.train_dataset
        true, labelled = train.extras["true_target"], train.extras["labelled"]
        intro = torch.tensor([next(t for t, group in enumerate(self.tasks) if c in group) for c in range(self.num_classes)])
        stage_of = torch.zeros(len(true), dtype=torch.long)
        generator = torch.Generator().manual_seed(self.base.seed + 2)
        for cls in range(self.num_classes):
            rows = (~labelled & (true == cls)).nonzero().flatten()
            rows = rows[torch.randperm(len(rows), generator=generator)]
            first = int(intro[cls])
            own = 0 if first == 0 else (len(rows) if first == self.num_stages else round(self.new_share * len(rows)))
            stage_of[rows[:own]] = first
            later = torch.arange(max(first, 1) + (first > 0), self.num_stages + 1)
            if len(rows) > own:
                stage_of[rows[own:]] = later[torch.arange(len(rows) - own) % len(later)]
        return stage_of

    def _heldout(self, split: str) -> DictDataset:
        """The held-out ``split`` samples with their true classes as targets (not the pool)."""
        dataset: DictDataset = getattr(self.base, f"{split}_dataset")
        rows = (~dataset.extras["pool"]).nonzero().flatten()
        true = dataset.extras["true_target"][rows]
        return DictDataset(dataset.inputs[rows], true, {"labelled": torch.zeros_like(true, dtype=torch.bool),
                                                         "true_target": true, "pool": torch.zeros_like(true, dtype=torch.bool)})

    def set_task(self, task: int) -> None:
        if not 0 <= task < self.num_tasks:
            raise ValueError(f"{type(self).__name__}: task must lie in [0, {self.num_tasks}), got {task}.")
        self.task = task
        if self.stage_of is None:
            return
        self.train_dataset = self.task_split("train", task)
        val = self.base.val_dataset
        pool = val.extras["pool"]
        in_stage = torch.zeros_like(pool)
        in_stage[pool.nonzero().flatten()] = self.stage_of[self.base.train_dataset.extras["pool"]] == task
        seen = torch.isin(val.extras["true_target"], torch.tensor(self.classes_seen(task)))
        self.val_dataset = TaskSubset(val, (in_stage | (~pool & seen)).nonzero().flatten(), task)
        self.test_dataset = self.task_split("test", task)

    def task_split(self, split: str, task: int) -> TaskSubset:
        """Stage ``task``'s training samples, or the held-out val / test samples of its classes."""
        if split == "train":
            return TaskSubset(self.base.train_dataset, (self.stage_of == task).nonzero().flatten(), task)
        dataset = self.heldout[split]
        return TaskSubset(dataset, torch.isin(dataset.targets, torch.tensor(self.tasks[task])).nonzero().flatten(), task)

    @property
    def batch_keys(self) -> frozenset[str]:
        return super().batch_keys | ({"view1", "view2"} if self.base.views else set())

    def on_after_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, Any]:
        return self.base.with_views(batch, self.trainer)
