"""Analysis: callbacks and commands that measure a model or an estimator and draw figures a person looks at (saliency maps, smoothing weights, risk curves)."""

from reglab.registry import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__)  # the family's techniques, from their cards
