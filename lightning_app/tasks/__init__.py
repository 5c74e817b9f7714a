"""LightningModules, one per task kind."""

from reglab.tasks.classification import ClassificationModule
from reglab.tasks.clip import CLIPModule
from reglab.tasks.embedding import EmbeddingModule
from reglab.tasks.levi import LEVIModule
from reglab.tasks.segmentation import SegmentationModule
from reglab.tasks.two_tower import TwoTowerModule

__all__ = ["CLIPModule", "ClassificationModule", "EmbeddingModule", "LEVIModule", "SegmentationModule", "TwoTowerModule"]
