"""Anomaly segmentation: techniques that find what a few normal references do not explain (few-shot, class-generalizable)."""

from reglab.registry import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__)  # the family's techniques, from their cards
