"""SVFit — fine-tune the top-r singular values of the pretrained weights (Sun et al., 2024, paper 60).

Each target weight is decomposed once, at setup, by an SVD ``W = U diag(sigma) V^T``. The top-r
singular vectors are frozen and only their singular values train, scaling the most important
directions of the pretrained weight:

    W' = W + U_r diag(sigma'_r - sigma_r) V_r^T,        sigma'_r trainable, initialised to sigma_r

(equivalently ``W_res + U_r diag(sigma'_r) V_r^T`` with the frozen residual
``W_res = W - U_r diag(sigma_r) V_r^T``, as in the paper). ``rank=None`` trains all
``min(out, in)`` singular values.

Method card (what it does, when it helps, what it costs): ``svfit.card.yaml`` beside this module.
"""

from __future__ import annotations

import lightning as L
import torch
from torch import Tensor, nn

from reglab.callbacks.peft.frozen_factors import FrozenFactorsTuning, effective_rank, weight_matrix


def svfit_factors(weight: Tensor, rank: int | None) -> tuple[Tensor, Tensor, Tensor]:
    """``(U_r, V_r^T, sigma_r)`` of an ``out x in`` matrix: the top-r singular triplets."""
    u, sigma, vh = torch.linalg.svd(weight.float(), full_matrices=False)
    r = effective_rank(rank, weight)
    return u[:, :r], vh[:r], sigma[:r]


class SVFit(FrozenFactorsTuning):
    """Train the top-r singular values of every target layer (see the module docstring).

    Args:
        rank: singular values trained per layer (``None`` = all).
        target_modules, pretrained_checkpoint: see :class:`~reglab.callbacks.peft.base.ParameterEfficientFineTuning`.
    """

    name = "svfit"

    def __init__(self, rank: int | None = None, target_modules: list[str] | None = None,
                 pretrained_checkpoint: str | None = None) -> None:
        if rank is not None and rank < 1:
            raise ValueError(f"SVFit: rank must be >= 1 or None, got {rank}")
        super().__init__(target_modules, pretrained_checkpoint)
        self.rank = rank

    def factors(self, module: nn.Module, layer_names: list[str], trainer: L.Trainer | None) -> dict[str, tuple[Tensor, Tensor, Tensor]]:
        return {name: svfit_factors(weight_matrix(module.get_submodule(name)), self.rank) for name in layer_names}
