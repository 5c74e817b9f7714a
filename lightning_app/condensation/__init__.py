"""Dataset condensation: the pipeline (condense, train a fresh model on the synthetic set, test it), its claim protocol and command; methods live in ``reglab.callbacks.condensation``."""
