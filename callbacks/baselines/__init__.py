"""The standard methods the papers compare against, in the same step contract."""

from callbacks.baselines.cutmix import CutMix
from callbacks.baselines.gce import GCE
from callbacks.baselines.label_smoothing import LabelSmoothing
from callbacks.baselines.mixup import Mixup

__all__ = ["CutMix", "GCE", "LabelSmoothing", "Mixup"]
