"""LightningModules, one per task kind."""

from lightning_app.tasks.classification import ClassificationModule
from lightning_app.tasks.levi import LEVIModule

__all__ = ["ClassificationModule", "LEVIModule"]
