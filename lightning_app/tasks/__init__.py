"""LightningModules, one per task kind."""

from lightning_app.tasks.classification import ClassificationModule

__all__ = ["ClassificationModule"]
