"""LightningModules, one per task kind."""

from reglab.tasks.classification import ClassificationModule
from reglab.tasks.levi import LEVIModule

__all__ = ["ClassificationModule", "LEVIModule"]
