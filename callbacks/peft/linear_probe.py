"""Linear probe: only the task head trains, ``logits = head(frozen_backbone(x))``.

Method card (what it does, when it helps, what it costs): ``linear_probe.card.yaml`` beside this module.
"""

from __future__ import annotations

from reglab.callbacks.peft.base import ParameterEfficientFineTuning


class LinearProbe(ParameterEfficientFineTuning):
    """Freeze everything but the task head.

    Args:
        pretrained_checkpoint: see :class:`~reglab.callbacks.peft.base.ParameterEfficientFineTuning`.
    """

    name = "linear_probe"

    def __init__(self, pretrained_checkpoint: str | None = None) -> None:
        super().__init__(target_modules=None, pretrained_checkpoint=pretrained_checkpoint)
