"""BitFit (Ben Zaken et al., ACL 2022): the task head and every bias term train (every parameter
whose name ends in ``bias``, ``in_proj_bias`` of ``nn.MultiheadAttention`` included),
``y = W x + b`` with ``W`` frozen and ``b`` trainable, in every layer.

Method card (what it does, when it helps, what it costs): ``bitfit.card.yaml`` beside this module.
"""

from __future__ import annotations

from torch import nn

from reglab.callbacks.peft.base import ParameterEfficientFineTuning


class BitFit(ParameterEfficientFineTuning):
    """Train the task head and every bias.

    Args:
        pretrained_checkpoint: see :class:`~reglab.callbacks.peft.base.ParameterEfficientFineTuning`.
    """

    name = "bitfit"

    def __init__(self, pretrained_checkpoint: str | None = None) -> None:
        super().__init__(target_modules=None, pretrained_checkpoint=pretrained_checkpoint)

    def trains(self, name: str, parameter: nn.Parameter) -> bool:
        # by name, not by module: nn.MultiheadAttention's is `in_proj_bias`
        return name.endswith("bias")
