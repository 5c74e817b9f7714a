"""Fine-tuning from pretrained weights.

:class:`PretrainedWeights` is a plain Lightning callback (not a technique: it changes no loss),
so it is exported here and not from ``callbacks``. LEVI (paper 53) is a model, not a callback:
:class:`reglab.tasks.levi.LEVIModule`.
"""

from reglab.callbacks.fine_tuning.pretrained_weights import (
    PretrainedWeights,
    copy_pretrained_weights,
    load_state_dict_file,
    pretrained_checkpoint_for,
)

__all__ = ["PretrainedWeights", "copy_pretrained_weights", "load_state_dict_file", "pretrained_checkpoint_for"]
