"""Continual learning: task sequences (``reglab fit-tasks``), the accuracy matrix and its scores.

Techniques for it live in ``callbacks.continual``; task splits in ``datamodules.tasks``.
"""

from lightning_app.continual.metrics import accuracy_matrix, average_accuracy, backward_transfer, forgetting
from lightning_app.continual.runner import TaskProgress, TaskSequenceRunner

__all__ = ["TaskProgress", "TaskSequenceRunner", "accuracy_matrix", "average_accuracy", "backward_transfer", "forgetting"]
