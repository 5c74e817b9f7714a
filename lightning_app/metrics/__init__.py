"""torchmetrics metrics shared by reglab's tasks and techniques."""

from reglab.metrics.classification import classification_metrics, per_class_accuracy_dict
from reglab.metrics.clustering import ClusteringAccuracy, align_clusters, cluster_to_class
from reglab.metrics.generation import DistinctN, NgramRepetition, PredictiveEntropy
from reglab.metrics.groups import GroupAccuracy
from reglab.metrics.noisy_labels import NoisyLabelMemorization
from reglab.metrics.opis import OPIS
from reglab.metrics.retrieval import RecallAtK

__all__ = ["OPIS", "ClusteringAccuracy", "DistinctN", "GroupAccuracy", "NgramRepetition", "NoisyLabelMemorization",
           "PredictiveEntropy", "RecallAtK", "align_clusters", "classification_metrics", "cluster_to_class", "per_class_accuracy_dict"]
