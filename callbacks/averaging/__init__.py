"""Weight averaging and self-distillation between model states, on :mod:`reglab.averaging`."""

from reglab.registry import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__)  # the family's techniques, from their cards
