"""Weight averaging and self-distillation between model states, on :mod:`lightning_app.averaging`."""

from callbacks.averaging.ema import EMA
from callbacks.averaging.mean_teacher import MeanTeacher
from callbacks.averaging.ogen import OGENSelfDistillation
from callbacks.averaging.swa import SWA

__all__ = ["EMA", "MeanTeacher", "OGENSelfDistillation", "SWA"]
