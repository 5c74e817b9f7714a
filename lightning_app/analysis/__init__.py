"""Analysis commands and claim protocols (the family of ``reglab.callbacks.analysis``): saliency, smoothers, risk curves."""
