"""Plain personalization tuning: ClassDiffusion's tuning (the modifier word's embedding and the U-Net's
cross-attention keys/values on a few images of the concept) without its semantic preservation loss — the
baseline of paper 51, Custom Diffusion's single-concept tuning without prior preservation.

Method card (what it does, when it helps, what it costs): ``plain_personalization.card.yaml`` beside this module.

Example:
    >>> from reglab.callbacks.generative import PlainPersonalization
    >>> PlainPersonalization().spl_weight
    0.0
"""

from __future__ import annotations

from reglab.callbacks.generative.class_diffusion import ClassDiffusion


class PlainPersonalization(ClassDiffusion):
    """:class:`~reglab.callbacks.generative.ClassDiffusion` with ``spl_weight=0`` (its ``spl`` term logs 0).

    Args:
        modifier: the placeholder word of the concept in the prompts (one word piece).
    """

    name = "plain_personalization"

    def __init__(self, modifier: str = "x") -> None:
        super().__init__(spl_weight=0.0, modifier=modifier)
