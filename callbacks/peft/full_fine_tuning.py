"""Full fine-tuning: every parameter trains, from the pretrained checkpoint (the reference arm).

Method card (what it does, when it helps, what it costs): ``full_fine_tuning.card.yaml`` beside this module.
"""

from __future__ import annotations

from torch import nn

from reglab.callbacks.peft.base import ParameterEfficientFineTuning


class FullFineTuning(ParameterEfficientFineTuning):
    """Train every parameter, starting from ``pretrained_checkpoint`` (the reference arm).

    A technique only so that it loads the pretrained weights the same way the PEFT methods do;
    without ``pretrained_checkpoint`` it changes nothing.
    """

    name = "full_fine_tuning"

    def __init__(self, pretrained_checkpoint: str | None = None) -> None:
        super().__init__(target_modules=None, pretrained_checkpoint=pretrained_checkpoint)

    def trains(self, name: str, parameter: nn.Parameter) -> bool:
        return True
