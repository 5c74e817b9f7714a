"""Frozen factors around a small trainable core: the adapter layer of SVFit, LoLDU and LoRA-SB.

The pretrained weight ``W`` (``out x in``; a convolution's kernel is read as ``out x (in*kh*kw)``)
stays as it is. Two frozen factors ``left`` (``out x r``) and ``right`` (``r x in``) span the
subspace the update may use, and only the core ``C`` between them trains:

    W' = W + left @ (s * C - s0 * C0) @ right

``C`` is a vector (read as a diagonal matrix: SVFit's singular values, LoLDU's D) or an ``r x r``
matrix (LoRA-SB's R). ``C0`` and ``s0`` are their initial values, so ``W' = W`` at the start and
the factorisation of ``W`` never has to be stored or subtracted: the paper's "residual + trainable
factorisation" and this delta form give the same outputs and the same gradients. The optional
scalar ``s`` is LoLDU's trainable scaling factor (``s = s0 = 1`` without it).

Nothing here depends on how the factors were found; :mod:`reglab.callbacks.peft` computes them.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from reglab.nn.weight_delta import WeightDeltaAdapter


def core_update(left: Tensor, right: Tensor, core: Tensor, core_init: Tensor,
                scale: Tensor | float = 1.0, scale_init: Tensor | float = 1.0) -> Tensor:
    """``left @ (scale * core - scale_init * core_init) @ right``: an ``out x in`` matrix.

    A 1-D core is a diagonal; it scales the columns of ``left`` instead of building the matrix.
    """
    change = scale * core - scale_init * core_init
    if change.dim() == 1:
        return (left * change) @ right
    return left @ change @ right


class CoreAdapter(WeightDeltaAdapter):
    """Wraps a layer that has a ``weight`` (``nn.Linear``, ``nn.Conv2d``, ...) as
    ``W' = W + left @ (s*C - s0*C0) @ right`` (see the module docstring).

    A :class:`~reglab.nn.weight_delta.WeightDeltaAdapter`: ``base_layer``, ``merge()`` and
    ``get_base_layer()`` as peft's LoRA layers, so :func:`reglab.peft_surgery.merge_adapters` treats both alike.

    Args:
        base_layer: the pretrained layer; its parameters are left to the caller to freeze.
        left, right: frozen factors, ``out x r`` and ``r x in``.
        core_init: the initial core, ``(r,)`` (diagonal) or ``(r, r)``.
        scale_init: initial value of a trainable scalar ``s``; ``None`` for no scalar.
        persistent_factors: store ``left``, ``right`` and ``core_init`` in checkpoints. Leave it
            off when they are recomputed from the frozen weights at setup (SVFit, LoLDU), so the
            checkpoint holds only the core; turn it on when they cannot be (LoRA-SB).
    """

    def __init__(self, base_layer: nn.Module, left: Tensor, right: Tensor, core_init: Tensor,
                 scale_init: float | None = None, persistent_factors: bool = False) -> None:
        super().__init__(base_layer)
        out_features = base_layer.weight.shape[0]
        in_features = base_layer.weight[0].numel()
        rank = core_init.shape[0]
        if left.shape != (out_features, rank) or right.shape != (rank, in_features):
            raise ValueError(
                f"CoreAdapter: factors of shapes {tuple(left.shape)} and {tuple(right.shape)} do not fit a "
                f"weight of {out_features} x {in_features} with a core of rank {rank}"
            )
        self.register_buffer("left", left.detach().float().clone(), persistent=persistent_factors)
        self.register_buffer("right", right.detach().float().clone(), persistent=persistent_factors)
        self.register_buffer("core_init", core_init.detach().float().clone(), persistent=persistent_factors)
        self.core = nn.Parameter(core_init.detach().float().clone())
        self.scale = None if scale_init is None else nn.Parameter(torch.tensor(float(scale_init)))
        self.scale_init = 1.0 if scale_init is None else float(scale_init)

    def delta_weight(self) -> Tensor:
        """The current change of the base weight, in the base weight's shape and dtype."""
        scale = 1.0 if self.scale is None else self.scale
        change = core_update(self.left, self.right, self.core, self.core_init, scale, self.scale_init)
        weight = self.base_layer.weight
        return change.reshape(weight.shape).to(weight.dtype)
