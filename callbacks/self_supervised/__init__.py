"""Self-supervised pretraining objectives (T-JEPA, MFM), in the same step contract."""

from reglab.registry import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__)  # the family's techniques, from their cards
