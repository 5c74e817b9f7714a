"""Domain generalization, robust fine-tuning and test-time adaptation: models that hold up on unseen domains."""

from reglab.registry import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__)  # the family's techniques, from their cards
