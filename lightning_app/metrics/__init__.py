"""torchmetrics metrics shared by reglab's tasks and techniques."""

from lightning_app.metrics.classification import classification_metrics, per_class_accuracy_dict
from lightning_app.metrics.noisy_labels import NoisyLabelMemorization

__all__ = ["NoisyLabelMemorization", "classification_metrics", "per_class_accuracy_dict"]
