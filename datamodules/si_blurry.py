"""The Si-Blurry online stream of MVP (Moon et al., ICCV 2023): stochastic blurry task boundaries.

A single online pass over a classification training set, cut into ``num_tasks`` tasks whose
class sets and sizes are random (official code: KHU-AGI/Si-Blurry, ``utils/online_sampler.py``,
the ``--rnd_NM`` branch its MVP script uses):

1. the classes are permuted with the stream seed; the first ``N`` % are *disjoint* classes (they
   appear in one task only), the rest *blurry* classes;
2. each group is cut at ``num_tasks - 1`` uniformly drawn points, so a task gets a random number
   of disjoint and of blurry classes (possibly none);
3. ``M`` % of the samples of blurry classes are *blurred*: the number ``floor(M/100 · #blurry
   samples)`` is cut at ``num_tasks - 1`` random points into per-task counts k_t; task t gives up
   k_t of its blurry-class samples to a shuffled pool and then takes k_t samples from that pool,
   so blurry classes leak into other tasks in random amounts (a task that owns fewer blurry-class
   samples than k_t gives up all it has, as in the official code, so at large M fewer move);
4. every task's samples are shuffled, and the stream is task 0, then task 1, ...

Two departures from the official code, both towards the paper's definition: class counts are not
rounded down to multiples of ``num_tasks`` (a leftover of its fixed-split mode, which silently drops
classes from the stream), and the samples a task gives up are drawn at random (the official code
takes the first ones in dataset order, i.e. one class's samples in a class-sorted dataset).

:class:`SiBlurryDataModule` wraps any :class:`~reglab.datamodules.base.ClassificationDataModule` and
yields the stream in order for one ``Trainer.fit`` epoch (``max_epochs=1``: every sample seen
once). The training loader is the base class's resumable one without shuffling, so a run resumes
in the middle of the stream batch for batch. Batches carry ``task`` (the stochastic task of the
sample); ``index`` is the sample's position in the base training set. Validation and test are the
base's full splits; ``reglab.continual.online`` evaluates on the seen classes' test samples.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor
from torch.utils.data import Dataset

from .base import ClassificationDataModule, DictDataset, ResumableDataLoader


@dataclass(frozen=True)
class SiBlurryStream:
    """One drawn stream.

    Attributes:
        order: ``(S,)`` positions in the training set, in stream order.
        task: ``(S,)`` the task of each stream position (non-decreasing).
        disjoint_classes, blurry_classes: per task, the classes it owns.
        blurred: positions of the samples that were moved through the blurry pool.
    """

    order: Tensor
    task: Tensor
    disjoint_classes: list[list[int]]
    blurry_classes: list[list[int]]
    blurred: Tensor

    @property
    def task_sizes(self) -> list[int]:
        return torch.bincount(self.task, minlength=len(self.disjoint_classes)).tolist()


def _random_cuts(total: int, parts: int, generator: torch.Generator) -> list[int]:
    """``parts + 1`` boundaries 0 = b_0 <= ... <= b_parts = total, the inner ones uniform in [0, total)."""
    if total == 0:
        return [0] * (parts + 1)
    inner = torch.randint(0, total, (parts - 1,), generator=generator).sort().values.tolist()
    return [0, *inner, total]


def si_blurry_stream(
    targets: Tensor, num_classes: int, num_tasks: int = 5, disjoint_percent: int = 50,
    blurry_percent: int = 10, seed: int = 0,
) -> SiBlurryStream:
    """Draw a Si-Blurry stream over samples with labels ``targets`` (see the module docstring).

    Example:
        >>> stream = si_blurry_stream(torch.arange(20) % 4, num_classes=4, num_tasks=2, seed=0)
        >>> sorted(stream.order.tolist()) == list(range(20)), len(sum(stream.disjoint_classes, []))
        (True, 2)
    """
    if num_tasks < 1:
        raise ValueError(f"si_blurry_stream: num_tasks must be at least 1, got {num_tasks}.")
    for name, value in (("disjoint_percent (N)", disjoint_percent), ("blurry_percent (M)", blurry_percent)):
        if not 0 <= value <= 100:
            raise ValueError(f"si_blurry_stream: {name} must lie in [0, 100], got {value}.")
    generator = torch.Generator().manual_seed(seed)
    class_order = torch.randperm(num_classes, generator=generator).tolist()
    num_disjoint = num_classes * disjoint_percent // 100
    groups = {}
    for kind, classes in (("disjoint", class_order[:num_disjoint]), ("blurry", class_order[num_disjoint:])):
        cuts = _random_cuts(len(classes), num_tasks, generator)
        groups[kind] = [classes[cuts[t] : cuts[t + 1]] for t in range(num_tasks)]

    def positions_of(classes: list[int]) -> Tensor:
        return torch.isin(targets, torch.tensor(classes, dtype=targets.dtype)).nonzero().flatten()

    disjoint = [positions_of(classes) for classes in groups["disjoint"]]
    blurry = [positions_of(classes) for classes in groups["blurry"]]
    num_blurred = sum(len(p) for p in blurry) * blurry_percent // 100
    cuts = _random_cuts(num_blurred, num_tasks, generator)
    counts = [cuts[t + 1] - cuts[t] for t in range(num_tasks)]
    given, kept = [], []
    for positions, count in zip(blurry, counts):
        positions = positions[torch.randperm(len(positions), generator=generator)]
        given.append(positions[:count])
        kept.append(positions[count:])
    pool = torch.cat(given)
    pool = pool[torch.randperm(len(pool), generator=generator)]
    starts = torch.tensor([0, *counts]).cumsum(0).clamp_max(len(pool)).tolist()
    order, task = [], []
    for t in range(num_tasks):
        members = torch.cat([disjoint[t], kept[t], pool[starts[t] : starts[t + 1]]])
        order.append(members[torch.randperm(len(members), generator=generator)])
        task.append(torch.full((len(members),), t, dtype=torch.long))
    return SiBlurryStream(torch.cat(order), torch.cat(task), groups["disjoint"], groups["blurry"], pool)


class StreamDataset(Dataset):
    """``dataset``'s samples at ``order`` (stream position i is ``dataset[order[i]]``), each tagged
    with its ``task``; ``index`` stays the position in ``dataset``."""

    def __init__(self, dataset: DictDataset, order: Tensor, task: Tensor) -> None:
        self.dataset, self.order, self.task = dataset, order, task
        self.targets = dataset.targets[order]

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, position: int) -> dict[str, Any]:
        return {**self.dataset[int(self.order[position])], "task": self.task[position]}

    @property
    def keys(self) -> tuple[str, ...]:
        return (*self.dataset.keys, "task")


class SiBlurryDataModule(ClassificationDataModule):
    """The Si-Blurry online stream over ``base``'s training split, for one online ``fit`` epoch.

    Args:
        base: the DataModule whose training split becomes the stream (batch size, workers and
            evaluation batch size are taken from it; its label noise and long tail apply).
        num_tasks: number of stochastic tasks (official default 5).
        disjoint_percent: N, the percentage of classes that appear in one task only (default 50).
        blurry_percent: M, the percentage of blurry-class samples moved across tasks (default 10).
        seed: seed of the stream (default ``base.seed``).

    Attributes:
        stream: the drawn :class:`SiBlurryStream` (after ``setup``).

    Example:
        >>> from reglab.datamodules import DigitsDataModule
        >>> data = SiBlurryDataModule(DigitsDataModule(flatten=True, batch_size=16))
        >>> data.setup("fit")
        >>> batch = next(iter(data.train_dataloader()))
        >>> torch.equal(batch["index"], data.stream.order[:16]), int(batch["task"].max())
        (True, 0)
    """

    def __init__(
        self,
        base: ClassificationDataModule,
        num_tasks: int = 5,
        disjoint_percent: int = 50,
        blurry_percent: int = 10,
        seed: Optional[int] = None,
    ) -> None:
        self.base = base
        self.num_classes, self.input_shape = base.num_classes, tuple(base.input_shape)
        super().__init__(
            batch_size=base.batch_size, num_workers=base.num_workers,
            seed=base.seed if seed is None else seed, eval_batch_size=base.eval_batch_size,
        )
        if num_tasks < 1:
            raise ValueError(f"SiBlurryDataModule: num_tasks must be at least 1, got {num_tasks}.")
        for name, value in (("disjoint_percent", disjoint_percent), ("blurry_percent", blurry_percent)):
            if not 0 <= value <= 100:
                raise ValueError(f"SiBlurryDataModule: {name} must lie in [0, 100] (a percentage), got {value}.")
        self.num_tasks, self.disjoint_percent, self.blurry_percent = num_tasks, disjoint_percent, blurry_percent
        self.stream: Optional[SiBlurryStream] = None

    def setup(self, stage: Optional[str] = None) -> None:
        if self.train_dataset is not None:
            return
        self.base.setup(stage)
        targets = self.base.train_dataset.targets
        self.stream = si_blurry_stream(
            targets, self.num_classes, self.num_tasks, self.disjoint_percent, self.blurry_percent, self.seed
        )
        self.train_dataset = StreamDataset(self.base.train_dataset, self.stream.order, self.stream.task)
        self.val_dataset, self.test_dataset = self.base.val_dataset, self.base.test_dataset
        self.predict_dataset = self.base.predict_dataset

    @property
    def num_train_samples(self) -> int:
        """Size of the base training set: ``index`` addresses it."""
        return self.base.num_train_samples

    def train_dataloader(self) -> ResumableDataLoader:
        """The stream in order (no shuffle), sharded by rank, resumable mid-stream."""
        loader = super().train_dataloader()
        # The stream's order is the point of the scenario: the sampler walks it as drawn.
        loader.sampler.shuffle = False
        return loader

    def state_dict(self) -> dict[str, Any]:
        return {"stream_seed": self.seed, "num_tasks": self.num_tasks,
                "disjoint_percent": self.disjoint_percent, "blurry_percent": self.blurry_percent}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict != self.state_dict():
            raise ValueError(
                f"SiBlurryDataModule: the checkpoint's stream {state_dict} differs from this run's "
                f"{self.state_dict()}; resume with the same seed, num_tasks, disjoint_percent and blurry_percent."
            )
