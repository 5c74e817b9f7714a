"""Fused kernels for the hot paths shared by reglab's techniques."""

from reglab.kernels.soft_cross_entropy import (
    soft_cross_entropy,
    soft_cross_entropy_reference,
    soft_cross_entropy_triton,
)

__all__ = ["soft_cross_entropy", "soft_cross_entropy_reference", "soft_cross_entropy_triton"]
