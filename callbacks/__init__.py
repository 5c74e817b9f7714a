"""Every reglab technique, one module per paper, grouped by family.

Each technique has a card beside its module (``<family>/<id>.card.yaml``, see
:mod:`reglab.registry`); ``__all__`` lists every built technique from the cards. Names are
imported on first access (PEP 562), so ``from reglab.callbacks import ELR`` loads ELR's module
only, not every family's dependencies.
"""

from reglab.registry import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__)
