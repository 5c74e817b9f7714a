"""Generative models: sampling commands, sample-quality measures and claim protocols (the family of ``reglab.callbacks.generative``)."""
