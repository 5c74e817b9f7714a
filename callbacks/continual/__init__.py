"""Continual learning: regularizers that work across the tasks of ``reglab fit-tasks``
(``lightning_app.continual``). Each regularizer is a no-op until its first ``on_task_end``;
experience replay rehearses from the first step."""

from callbacks.continual.ewc import EWC
from callbacks.continual.feature_distillation import FeatureDistillation
from callbacks.continual.l2_previous import L2ToPreviousTask
from callbacks.continual.lwf import LwF
from callbacks.continual.mvp import MVP
from callbacks.continual.ovor import OVOR
from callbacks.continual.replay import ExperienceReplay
from callbacks.continual.si import SI
from callbacks.continual.teen import TEEN

__all__ = ["EWC", "FeatureDistillation", "L2ToPreviousTask", "LwF", "ExperienceReplay", "SI", "OVOR", "TEEN", "MVP"]
