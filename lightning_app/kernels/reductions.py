"""Reductions shared by the torch reference and the Triton backend of the kernels (a module of its
own so that the backend, which the public module loads lazily, does not import it back)."""

from __future__ import annotations

from typing import Literal

import torch

Reduction = Literal["mean", "sum", "none"]


def reduce_row_losses(row_losses: torch.Tensor, reduction: Reduction) -> torch.Tensor:
    """Reduce per-row losses of shape ``(N,)`` the way ``reduction`` asks."""
    if reduction == "mean":
        return row_losses.mean()
    if reduction == "sum":
        return row_losses.sum()
    return row_losses
