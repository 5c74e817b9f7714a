"""Continual learning: task sequences (``reglab fit-tasks``), the accuracy matrix and its scores (both
evaluation rules, forward transfer) and the cost of each task.

Techniques for it live in ``reglab.callbacks.continual``; task splits in ``reglab.datamodules.tasks``.
"""

from reglab.continual.metrics import accuracy_matrix, average_accuracy, backward_transfer, forgetting, forward_transfer
from reglab.continual.runner import TaskProgress, TaskSequenceRunner

__all__ = ["TaskProgress", "TaskSequenceRunner", "accuracy_matrix", "average_accuracy", "backward_transfer", "forgetting", "forward_transfer"]
