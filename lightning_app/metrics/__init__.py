"""torchmetrics metrics shared by reglab's tasks and techniques."""

from reglab.metrics.classification import classification_metrics, per_class_accuracy_dict
from reglab.metrics.noisy_labels import NoisyLabelMemorization

__all__ = ["NoisyLabelMemorization", "classification_metrics", "per_class_accuracy_dict"]
