"""Techniques for learning with noisy labels and long-tailed data."""

from reglab.callbacks.noisy_labels.elr import ELR

__all__ = ["ELR"]
