"""The standard methods the papers compare against, in the same step contract."""

from callbacks.baselines.gce import GCE
from callbacks.baselines.label_smoothing import LabelSmoothing

__all__ = ["GCE", "LabelSmoothing"]
