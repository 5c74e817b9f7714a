"""Weight averaging and self-distillation between model states, on :mod:`reglab.averaging`."""

from reglab.callbacks.averaging.ema import EMA
from reglab.callbacks.averaging.mean_teacher import MeanTeacher
from reglab.callbacks.averaging.ogen_self_distillation import OGENSelfDistillation
from reglab.callbacks.averaging.swa import SWA

__all__ = ["EMA", "MeanTeacher", "OGENSelfDistillation", "SWA"]
