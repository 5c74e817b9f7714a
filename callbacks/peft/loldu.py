"""LoLDU — train the diagonal of an LDU decomposition of the pretrained weights (Shi et al., 2024, paper 69).

Each target weight is factorised once, at setup, with partial pivoting:
``W = P L D U`` (``P`` a permutation, ``L`` unit lower-triangular, ``D`` diagonal, ``U`` unit
upper-triangular). The first r columns of ``P L`` and rows of ``U`` are frozen; the diagonal
``z`` (initialised to ``D_r``) and a scalar ``s`` train:

    W' = W + (P L)_r diag(s * z - s0 * D_r) U_r,        s0 = alpha / r

(the paper writes it as ``W_res + s * (P L)_r diag(z) U_r`` with the frozen residual
``W_res = W - s0 * (P L)_r diag(D_r) U_r``). Defaults follow the official implementation's
``LoLDUParametrization``: ``alpha = 1`` and a rank as large as the layers (768 for ViT-B), here
``rank=None`` = ``min(out, in)``.

Method card (what it does, when it helps, what it costs): ``loldu.card.yaml`` beside this module.
"""

from __future__ import annotations

import lightning as L
import torch
from torch import Tensor, nn

from reglab.callbacks.peft.frozen_factors import FrozenFactorsTuning, effective_rank, weight_matrix


def loldu_factors(weight: Tensor, rank: int | None) -> tuple[Tensor, Tensor, Tensor]:
    """``((P L)_r, U_r, D_r)`` of an ``out x in`` matrix with ``W = P L diag(D) U``."""
    permutation, lower, upper = torch.linalg.lu(weight.float())
    diagonal = torch.diagonal(upper)
    if (diagonal == 0).any():
        raise ValueError("LoLDU: a pretrained weight has a zero pivot (it is rank-deficient); "
                         "exclude that layer with target_modules")
    unit_upper = upper / diagonal.unsqueeze(-1)
    r = effective_rank(rank, weight)
    return (permutation @ lower)[:, :r], unit_upper[:r], diagonal[:r]


class LoLDU(FrozenFactorsTuning):
    """Train the LDU diagonal and a scale of every target layer (see the module docstring).

    Args:
        rank: diagonal entries trained per layer (``None`` = all ``min(out, in)``).
        alpha: the scale starts at ``alpha / rank``.
        target_modules, pretrained_checkpoint: see :class:`~reglab.callbacks.peft.base.ParameterEfficientFineTuning`.
    """

    name = "loldu"

    def __init__(self, rank: int | None = None, alpha: float = 1.0, target_modules: list[str] | None = None,
                 pretrained_checkpoint: str | None = None) -> None:
        if rank is not None and rank < 1:
            raise ValueError(f"LoLDU: rank must be >= 1 or None, got {rank}")
        super().__init__(target_modules, pretrained_checkpoint)
        self.rank, self.alpha = rank, alpha

    def scale_init(self, rank: int) -> float | None:
        return self.alpha / rank

    def factors(self, module: nn.Module, layer_names: list[str], trainer: L.Trainer | None) -> dict[str, tuple[Tensor, Tensor, Tensor]]:
        return {name: loldu_factors(weight_matrix(module.get_submodule(name)), self.rank) for name in layer_names}
