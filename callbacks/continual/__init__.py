"""Continual learning: regularizers that work across the tasks of ``reglab fit-tasks``
(``lightning_app.continual``). Each is a no-op until its first ``on_task_end``."""

from callbacks.continual.ewc import EWC
from callbacks.continual.feature_distillation import FeatureDistillation
from callbacks.continual.l2_previous import L2ToPreviousTask
from callbacks.continual.lwf import LwF

__all__ = ["EWC", "FeatureDistillation", "L2ToPreviousTask", "LwF"]
