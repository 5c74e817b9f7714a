"""Continual learning: regularizers that work across the tasks of ``reglab fit-tasks``
(``reglab.continual``). Each regularizer is a no-op until its first ``on_task_end``;
experience replay rehearses from the first step."""

from reglab.callbacks.continual.ewc import EWC
from reglab.callbacks.continual.feature_distillation import FeatureDistillation
from reglab.callbacks.continual.l2_previous import L2ToPreviousTask
from reglab.callbacks.continual.lwf import LwF
from reglab.callbacks.continual.mvp import MVP
from reglab.callbacks.continual.ovor import OVOR
from reglab.callbacks.continual.experience_replay import ExperienceReplay
from reglab.callbacks.continual.si import SI
from reglab.callbacks.continual.teen import TEEN

__all__ = ["EWC", "FeatureDistillation", "L2ToPreviousTask", "LwF", "ExperienceReplay", "SI", "OVOR", "TEEN", "MVP"]
