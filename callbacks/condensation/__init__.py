"""Dataset condensation: methods that synthesize a few training images per class; the pipeline trains a fresh model on them and tests it."""

from reglab.registry import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__)  # the family's techniques, from their cards
