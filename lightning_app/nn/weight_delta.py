"""A layer wrapped as ``W + delta``: the common half of the adapters that add a computed update to a
frozen weight (:class:`~reglab.nn.core_adapter.CoreAdapter`, LoCA's inverse-DCT layer).

Like peft's LoRA layers, it keeps the wrapped layer as ``base_layer`` and offers ``merge()`` and
``get_base_layer()``, so :func:`reglab.peft_surgery.merge_adapters` treats all of them alike.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import functional_call


class WeightDeltaAdapter(nn.Module):
    """Runs ``base_layer`` with ``weight + delta_weight()``; subclasses compute the update.

    Args:
        base_layer: a layer with a ``weight`` (``nn.Linear``, ``nn.Conv2d``, ...); its parameters are
            left to the caller to freeze.
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.merged = False

    def delta_weight(self) -> Tensor:
        """The current change of the base weight, in the base weight's shape and dtype."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        if self.merged:
            return self.base_layer(x)
        weight = self.base_layer.weight + self.delta_weight()
        return functional_call(self.base_layer, {"weight": weight}, (x,))

    @torch.no_grad()
    def merge(self) -> None:
        """Add the update into the base weight (for inference: no extra cost per step)."""
        if not self.merged:
            self.base_layer.weight += self.delta_weight()
            self.merged = True

    def get_base_layer(self) -> nn.Module:
        return self.base_layer
