"""Backbones by name (see :mod:`lightning_app.models.registry`)."""

from lightning_app.models import small  # noqa: F401  (registers the built-in backbones)
from lightning_app.models import vit  # noqa: F401  (registers the tiny ViT)
from lightning_app.models.registry import create_backbone, list_backbones, register_backbone

__all__ = ["create_backbone", "list_backbones", "register_backbone"]
