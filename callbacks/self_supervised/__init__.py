"""Self-supervised pretraining: objectives that train a backbone without labels, before a probe or fine-tuning."""

from reglab.registry import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__)  # the family's techniques, from their cards
