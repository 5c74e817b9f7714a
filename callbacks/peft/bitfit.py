"""BitFit (Ben Zaken et al., ACL 2022): the task head and every bias term train (every parameter
whose name ends in ``bias``, ``in_proj_bias`` of ``nn.MultiheadAttention`` included),
``y = W x + b`` with ``W`` frozen and ``b`` trainable, in every layer.

Method card:
    what it does: shifts every layer's pre-activations by trained biases;
    when it helps: small target sets close to the source task; a standard PEFT baseline;
    what it costs: one vector per layer (< 0.1-1 % of the parameters); full backward pass
        through the network; layers without bias (the built-in CNN's convolutions) get nothing.
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
