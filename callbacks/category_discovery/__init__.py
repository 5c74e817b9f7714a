"""Category discovery: techniques that find new classes in unlabelled data beside known labelled ones (novel and generalized category discovery, and its continual form)."""

from reglab.registry import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__)  # the family's techniques, from their cards
