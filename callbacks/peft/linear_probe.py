"""Linear probe: only the task head trains, ``logits = head(frozen_backbone(x))``.

Method card:
    what it does: fits a linear classifier on the frozen pretrained features;
    when it helps: the features already separate the target classes; the least forgetting
        (none, apart from the head); the reference for #36 and #37;
    what it costs: only the head's parameters and gradients; the backbone's forward pass.
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
