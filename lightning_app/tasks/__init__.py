"""LightningModules, one per task kind."""

from reglab.tasks.anomaly import AnomalySegmentationModule
from reglab.tasks.autoregressive_image import AutoregressiveImageModule
from reglab.tasks.classification import ClassificationModule
from reglab.tasks.clip import CLIPModule
from reglab.tasks.dense_retrieval import DenseRetrievalModule
from reglab.tasks.diffusion import DiffusionModule
from reglab.tasks.discovery import ContinualDiscoveryModule, DiscoveryModule
from reglab.tasks.embedding import EmbeddingModule
from reglab.tasks.language_model import LanguageModelModule
from reglab.tasks.levi import LEVIModule
from reglab.tasks.multi_input import MultiInputRetrievalModule
from reglab.tasks.segmentation import SegmentationModule
from reglab.tasks.sparse_retrieval import SparseRetrievalModule
from reglab.tasks.two_tower import TwoTowerModule
from reglab.tasks.vae import VAEModule

__all__ = ["AnomalySegmentationModule", "AutoregressiveImageModule", "CLIPModule", "ClassificationModule",
           "ContinualDiscoveryModule", "DenseRetrievalModule", "DiffusionModule", "DiscoveryModule", "EmbeddingModule",
           "LanguageModelModule", "LEVIModule", "MultiInputRetrievalModule", "SegmentationModule",
           "SparseRetrievalModule", "TwoTowerModule", "VAEModule"]
