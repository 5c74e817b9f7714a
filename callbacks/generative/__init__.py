"""Generative models and dense-prediction modules: techniques for diffusion, autoregressive, variational and language models, and the layers of dense decoders."""

from reglab.registry import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__)  # the family's techniques, from their cards
