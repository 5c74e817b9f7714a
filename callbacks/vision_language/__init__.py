"""Vision-language and open-set prediction: prediction rules and linear-evaluation heads over a trained
model's outputs (Loki's Fréchet mean, naive Bayes vs logistic-regression probes on frozen features)."""

from reglab.registry import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__)  # the family's techniques, from their cards
