"""Task sequences over any classification DataModule: class-, task-incremental and few-shot sessions.

:class:`TaskSequenceDataModule` wraps a :class:`~reglab.datamodules.base.ClassificationDataModule` and
shows one task at a time: :meth:`~TaskSequenceDataModule.set_task` selects the classes whose
samples the train/val/test loaders yield. The class order is a seeded permutation; tasks split it
into consecutive groups.

* ``scenario="class"`` (class-incremental): one head over all classes; at test time the model
  must tell apart every class seen so far, without being told the task.
* ``scenario="task"`` (task-incremental): the task is known at test time; evaluation picks among
  the task's own classes only (``reglab.continual`` applies that mask).
* few-shot class-incremental sessions: ``first_task_classes`` classes in a base session with all
  their samples, then the remaining classes in ``num_tasks - 1`` sessions of N ways with
  ``shots`` training samples per class (validation and test stay complete).
* ``joint=True`` (joint training, the upper bound of the family): task t trains on the data of
  every task 0..t at once (each sample keeps its own ``task`` tag); evaluation per task is
  unchanged, so its accuracy matrix compares directly with the sequential runs.
* ``pretrain_fraction``: a seeded, class-stratified fraction of the training images is set aside
  for pretraining a backbone and never appears in any task; ``pretraining=True`` shows exactly
  those images (all classes, one task) for the pretraining fit
  (``configs/experiment/split_digits_pretrain.yaml``).

Every batch carries ``task`` (the index of the task the sample belongs to); ``index`` stays the
sample's position in the *whole* training set, so per-sample state of a technique can be sized
once (``num_train_samples`` is the base training-set size) and survive task changes.
"""

from __future__ import annotations

from typing import Any, Literal, Optional

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from .base import ClassificationDataModule, DictDataset
from .splits import stratified_split

Scenario = Literal["class", "task"]

#: what the base DataModule says about its classes and their text, which a task sequence shows as the base
#: does (the tiny CLIP's zero-shot prompts and prompt learners read them from the trainer's DataModule)
DESCRIBED_BY_BASE = ("class_names", "class_prompts", "tokenizer", "max_length", "domain_names")


class TaskSubset(Dataset):
    """The samples of ``dataset`` at ``positions``, each tagged with ``task`` (or, for the union of
    several tasks, with its own entry of ``sample_tasks``); ``index`` is kept as the position in
    ``dataset``."""

    def __init__(self, dataset: DictDataset, positions: Tensor, task: int, sample_tasks: Optional[Tensor] = None) -> None:
        self.dataset, self.positions, self.task = dataset, positions, task
        self.sample_tasks = sample_tasks

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, position: int) -> dict[str, Any]:
        task = self.task if self.sample_tasks is None else int(self.sample_tasks[position])
        return {**self.dataset[int(self.positions[position])], "task": task}

    @property
    def keys(self) -> tuple[str, ...]:
        return (*self.dataset.keys, "task")


def split_classes(class_order: list[int], num_tasks: int, first_task_classes: Optional[int] = None) -> list[list[int]]:
    """Consecutive groups of ``class_order``: the first of ``first_task_classes`` classes (when
    given), the rest evenly; every group gets at least one class.

    Example:
        >>> split_classes(list(range(10)), 5)
        [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
        >>> split_classes(list(range(10)), 3, first_task_classes=6)
        [[0, 1, 2, 3, 4, 5], [6, 7], [8, 9]]
    """
    num_classes, first = len(class_order), first_task_classes
    if first is not None and not (0 < first < num_classes and num_tasks >= 2):
        raise ValueError(
            f"split_classes: a base session of {first} classes needs 0 < first_task_classes < {num_classes} "
            f"and at least 2 tasks, got num_tasks={num_tasks}."
        )
    start, even_tasks = (first, num_tasks - 1) if first is not None else (0, num_tasks)
    remaining = num_classes - start
    if even_tasks < 1 or remaining % even_tasks:
        raise ValueError(
            f"split_classes: {remaining} classes do not split evenly into {even_tasks} tasks; "
            "change num_tasks or first_task_classes."
        )
    per_task = remaining // even_tasks
    groups = [class_order[:first]] if first is not None else []
    return groups + [class_order[start + i * per_task : start + (i + 1) * per_task] for i in range(even_tasks)]


class TaskSequenceDataModule(ClassificationDataModule):
    """A sequence of tasks over ``base``'s classes, one visible at a time (see the module docstring).

    Args:
        base: the DataModule whose splits are divided into tasks (its label noise and long tail
            apply as usual; batch size, workers and seed are taken from it).
        num_tasks: number of tasks (sessions).
        scenario: ``"class"`` or ``"task"`` incremental.
        class_order_seed: seed of the class permutation (default: ``base.seed``); ``None`` with
            ``shuffle_classes=False`` keeps 0..C-1.
        shuffle_classes: permute the classes before splitting them.
        first_task_classes: size of a base session (few-shot class-incremental), else tasks are even.
        shots: training samples per class in every task after the first (few-shot sessions).
        joint: train task t on the union of tasks 0..t (joint training, the upper bound).
        pretrain_fraction: fraction of every class's training images set aside for pretraining
            (drawn with the base seed); no task trains on them.
        pretraining: show only the set-aside images, all classes as one task (for the pretraining
            fit; needs ``pretrain_fraction > 0``).

    Attributes:
        task: the current task; ``tasks[t]`` the classes of task ``t``.

    Example:
        >>> from reglab.datamodules import DigitsDataModule
        >>> data = TaskSequenceDataModule(DigitsDataModule(flatten=True, batch_size=8), num_tasks=5)
        >>> data.setup("fit")
        >>> data.set_task(1)
        >>> batch = next(iter(data.train_dataloader()))
        >>> sorted(set(batch["target"].tolist()) | set(data.tasks[1])) == sorted(data.tasks[1]), batch["task"][0].item()
        (True, 1)
    """

    def __init__(
        self,
        base: ClassificationDataModule,
        num_tasks: int = 5,
        scenario: Scenario = "class",
        class_order_seed: Optional[int] = None,
        shuffle_classes: bool = True,
        first_task_classes: Optional[int] = None,
        shots: Optional[int] = None,
        joint: bool = False,
        pretrain_fraction: float = 0.0,
        pretraining: bool = False,
    ) -> None:
        if scenario not in ("class", "task"):
            raise ValueError(f"TaskSequenceDataModule: scenario must be 'class' or 'task', got {scenario!r}.")
        if shots is not None and shots < 1:
            raise ValueError(f"TaskSequenceDataModule: shots must be at least 1, got {shots}.")
        if joint and scenario != "class":
            raise ValueError(
                "TaskSequenceDataModule: joint training trains one head on all seen classes; use "
                "scenario='class' with joint=True."
            )
        if not 0.0 <= pretrain_fraction < 1.0:
            raise ValueError(f"TaskSequenceDataModule: pretrain_fraction must lie in [0, 1), got {pretrain_fraction}.")
        if pretraining and pretrain_fraction == 0.0:
            raise ValueError(
                "TaskSequenceDataModule: pretraining=True shows the images set aside for pretraining, but "
                "pretrain_fraction is 0; set pretrain_fraction (e.g. 0.5)."
            )
        self.base = base
        self.num_classes, self.input_shape = base.num_classes, tuple(base.input_shape)
        super().__init__(
            batch_size=base.batch_size, num_workers=base.num_workers, seed=base.seed,
            eval_batch_size=base.eval_batch_size,
        )
        self.num_tasks, self.scenario, self.shots = num_tasks, scenario, shots
        self.joint, self.pretrain_fraction, self.pretraining = joint, pretrain_fraction, pretraining
        classes = list(range(self.num_classes))
        if shuffle_classes:
            generator = torch.Generator().manual_seed(base.seed if class_order_seed is None else class_order_seed)
            classes = torch.randperm(self.num_classes, generator=generator).tolist()
        self.class_order = classes
        self.tasks = split_classes(classes, num_tasks, first_task_classes)
        self.task = 0

    # -- the sequence -----------------------------------------------------------------------------
    def classes_seen(self, task: Optional[int] = None) -> list[int]:
        """The classes of tasks 0..``task`` (default: the current task)."""
        task = self.task if task is None else task
        return [c for group in self.tasks[: task + 1] for c in group]

    def set_task(self, task: int) -> None:
        """Make the loaders yield task ``task``'s samples (may be called before :meth:`setup`)."""
        if not 0 <= task < self.num_tasks:
            raise ValueError(f"TaskSequenceDataModule: task must lie in [0, {self.num_tasks}), got {task}.")
        self.task = task
        if self.base.train_dataset is None:
            return
        if self.pretraining:  # all classes: the set-aside training images, the whole val / test splits
            self.train_dataset = TaskSubset(self.base.train_dataset, self._pretrain_positions(), 0)
            self.val_dataset, self.test_dataset = (self._whole(split) for split in ("val", "test"))
            return
        seen = range(task + 1) if self.joint else [task]
        self.train_dataset, self.val_dataset = (self._union(split, seen, task) for split in ("train", "val"))
        self.test_dataset = self.task_split("test", task)

    def _union(self, split: str, tasks: range | list[int], task: int) -> TaskSubset:
        """The samples of ``tasks`` in ``split``, each tagged with its own task."""
        parts = [self.task_split(split, t) for t in tasks]
        if len(parts) == 1:
            return parts[0]
        sample_tasks = torch.cat([torch.full((len(p),), p.task) for p in parts])
        return TaskSubset(parts[0].dataset, torch.cat([p.positions for p in parts]), task, sample_tasks)

    def _whole(self, split: str) -> TaskSubset:
        dataset: DictDataset = getattr(self.base, f"{split}_dataset")
        return TaskSubset(dataset, torch.arange(len(dataset)), 0)

    def _pretrain_positions(self) -> Tensor:
        """Training positions set aside for pretraining (empty without ``pretrain_fraction``)."""
        if self.pretrain_fraction == 0.0:
            return torch.empty(0, dtype=torch.long)
        targets = self.base.train_dataset.targets
        return stratified_split(targets, {"pretrain": self.pretrain_fraction}, self.base.seed)["pretrain"]

    def task_split(self, split: str, task: int) -> TaskSubset:
        """Task ``task``'s samples of ``split`` (``train``/``val``/``test``); few-shot sessions
        keep ``shots`` training samples per class, drawn with the base seed; training images
        set aside for pretraining are left out."""
        dataset: DictDataset = getattr(self.base, f"{split}_dataset")
        members = torch.isin(dataset.targets, torch.tensor(self.tasks[task]))
        if split == "train":
            members[self._pretrain_positions()] = False
        positions = members.nonzero().flatten()
        if split == "train" and self.shots is not None and task > 0:
            generator = torch.Generator().manual_seed(self.base.seed + task)
            kept = []
            for cls in self.tasks[task]:
                of_class = positions[dataset.targets[positions] == cls]
                kept.append(of_class[torch.randperm(len(of_class), generator=generator)[: self.shots]])
            positions = torch.cat(kept).sort().values
        return TaskSubset(dataset, positions, task)

    def task_dataloader(self, split: str, task: int) -> DataLoader:
        """An unshuffled loader over task ``task``'s ``split`` (for the accuracy matrix)."""
        return self._eval_dataloader(self.task_split(split, task))

    def __getattr__(self, name: str) -> Any:
        # only reached when normal lookup fails; a base without the description raises AttributeError as usual
        if name in DESCRIBED_BY_BASE and "base" in self.__dict__:
            return getattr(self.base, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    # -- ClassificationDataModule -------------------------------------------------------------------
    def setup(self, stage: Optional[str] = None) -> None:
        self.base.setup(stage)
        if self.train_dataset is None:
            self.set_task(self.task)

    @property
    def num_train_samples(self) -> int:
        """Size of the *whole* training set: ``index`` addresses it in every task."""
        return self.base.num_train_samples

    @property
    def batch_keys(self) -> frozenset[str]:
        return frozenset(self._require_setup().train_dataset.keys)

    def train_dataloader(self) -> Any:
        # Each task gets its own shuffle stream, so the same permutation is not reused per task.
        loader = super().train_dataloader()
        loader.sampler.seed = self.seed + self.task
        return loader

    def state_dict(self) -> dict[str, Any]:
        return {"task": self.task, "class_order": list(self.class_order)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if list(state_dict["class_order"]) != self.class_order:
            raise ValueError(
                f"TaskSequenceDataModule: the checkpoint's class order {state_dict['class_order']} differs from "
                f"this run's {self.class_order}; resume with the same seed / class_order_seed."
            )
        self.set_task(int(state_dict["task"]))
