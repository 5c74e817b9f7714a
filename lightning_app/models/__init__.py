"""Backbones by name (see :mod:`reglab.models.registry`)."""

from reglab.models import small  # noqa: F401  (registers the built-in backbones)
from reglab.models import unet  # noqa: F401  (registers the tiny U-Net, a dense backbone)
from reglab.models import vit  # noqa: F401  (registers the tiny ViT)
from reglab.models.registry import create_backbone, list_backbones, register_backbone

__all__ = ["create_backbone", "list_backbones", "register_backbone"]
