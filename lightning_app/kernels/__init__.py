"""Fused kernels for the hot paths shared by reglab's techniques."""

from reglab.kernels.selective_scan import selective_scan, selective_scan_reference, selective_scan_triton
from reglab.kernels.soft_cross_entropy import (
    soft_cross_entropy,
    soft_cross_entropy_reference,
    soft_cross_entropy_triton,
)

__all__ = ["selective_scan", "selective_scan_reference", "selective_scan_triton",
           "soft_cross_entropy", "soft_cross_entropy_reference", "soft_cross_entropy_triton"]
