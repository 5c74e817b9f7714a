"""The standard methods the papers compare against, in the same step contract."""

from reglab.callbacks.baselines.cutmix import CutMix
from reglab.callbacks.baselines.gce import GCE
from reglab.callbacks.baselines.label_smoothing import LabelSmoothing
from reglab.callbacks.baselines.mixup import Mixup

__all__ = ["CutMix", "GCE", "LabelSmoothing", "Mixup"]
