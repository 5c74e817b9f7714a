"""One fixed task of a :class:`~reglab.datamodules.tasks.TaskSequenceDataModule`, chosen by argument, so
a config can say "the source classes" or "the target classes" (pretrain here, fine-tune there)."""

from __future__ import annotations

from typing import Any

from .base import ClassificationDataModule
from .tasks import TaskSequenceDataModule


class ClassSplitDataModule(TaskSequenceDataModule):
    """The classes of task ``task`` of ``base`` split into ``num_tasks`` groups in class order
    (by default 2: classes 0..C/2-1 are task 0, the rest task 1). Heads keep all classes.

    Example:
        >>> from reglab.datamodules import DigitsDataModule
        >>> target = ClassSplitDataModule(DigitsDataModule(batch_size=8), task=1)
        >>> target.tasks[target.task]
        [5, 6, 7, 8, 9]
    """

    def __init__(self, base: ClassificationDataModule, task: int, num_tasks: int = 2,
                 shuffle_classes: bool = False, **kwargs: Any) -> None:
        super().__init__(base, num_tasks=num_tasks, shuffle_classes=shuffle_classes, **kwargs)
        self.set_task(task)
