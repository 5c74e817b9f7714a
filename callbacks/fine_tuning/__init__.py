"""Fine-tuning from pretrained weights.

:class:`PretrainedWeights` is a plain Lightning callback (not a technique: it changes no loss),
so it is exported here and not from ``callbacks``. The state-dict helpers it uses live in the core
(:mod:`reglab.checkpoints`). LEVI (paper 53) is a model, not a callback:
:class:`reglab.tasks.levi.LEVIModule`.
"""

from reglab.callbacks.fine_tuning.pretrained_weights import PretrainedWeights

__all__ = ["PretrainedWeights"]
