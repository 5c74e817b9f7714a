"""Fine-tuning from pretrained weights.

:class:`PretrainedWeights` is a plain Lightning callback (not a technique: it changes no loss),
so it is exported here and not from ``callbacks``. LEVI (paper 53) is a model, not a callback:
:class:`reglab.tasks.levi.LEVIModule`.
"""

from reglab.registry import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(
    __name__, extra={name: "pretrained_weights" for name in ("PretrainedWeights", "copy_pretrained_weights", "load_state_dict_file", "pretrained_checkpoint_for")}
)
