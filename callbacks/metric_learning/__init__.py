"""Metric learning and retrieval: losses, regularizers and self-supervised objectives on embeddings."""

from reglab.registry import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__)  # the family's techniques, from their cards
