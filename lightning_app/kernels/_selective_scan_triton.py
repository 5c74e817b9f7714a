"""Triton backend of :func:`reglab.kernels.selective_scan` (forward only).

Kept in its own module so that importing :mod:`reglab.kernels` never imports triton, and so that
``TRITON_INTERPRET=1`` only has to be set before the first call that loads this module (triton
chooses interpreting or compiling when the ``@triton.jit`` decorator runs). Call it through
:func:`reglab.kernels.selective_scan_triton`, which validates inputs.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# A program holds its (channels, states) block of the state and of A in fp32 registers; 4096
# values of each is 32 per thread at 4 warps, and the default caps channels per program at 32 so
# that short sequences of a wide model still spread over many programs.
MAX_BLOCK_ELEMENTS = 4096
MAX_BLOCK_DIM = 32


@triton.jit
def _selective_scan_kernel(
    u_ptr,
    delta_ptr,
    A_ptr,
    B_ptr,
    C_ptr,
    D_ptr,
    z_ptr,
    bias_ptr,
    out_ptr,
    dim,
    d_state,
    length,
    HAS_D: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr,
    BLOCK_DIM: tl.constexpr,
    BLOCK_STATE: tl.constexpr,
):
    # int64 so that batch * dim * length cannot overflow for large inputs.
    batch = tl.program_id(0).to(tl.int64)
    channels = (tl.program_id(1) * BLOCK_DIM + tl.arange(0, BLOCK_DIM)).to(tl.int64)
    states = tl.arange(0, BLOCK_STATE).to(tl.int64)
    channel_in = channels < dim
    state_in = states < d_state
    # Padded channels and states read A = 0, delta = u = B = C = 0: their state stays 0.
    A = tl.load(A_ptr + channels[:, None] * d_state + states[None, :],
                mask=channel_in[:, None] & state_in[None, :], other=0.0).to(tl.float32)
    if HAS_D:
        skip = tl.load(D_ptr + channels, mask=channel_in, other=0.0).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + channels, mask=channel_in, other=0.0).to(tl.float32)
    channel_rows = batch * dim * length + channels * length  # (BLOCK_DIM,) offsets of t = 0
    state_rows = batch * d_state * length + states * length
    h = tl.zeros((BLOCK_DIM, BLOCK_STATE), dtype=tl.float32)
    for t in range(0, length):
        u = tl.load(u_ptr + channel_rows + t, mask=channel_in, other=0.0).to(tl.float32)
        dt = tl.load(delta_ptr + channel_rows + t, mask=channel_in, other=0.0).to(tl.float32)
        if HAS_BIAS:
            dt = dt + bias
        if SOFTPLUS:
            # torch's softplus threshold (20): above it softplus(x) = x to fp32 precision.
            dt = tl.where(dt <= 20.0, tl.log(1.0 + tl.exp(tl.minimum(dt, 20.0))), dt)
        B = tl.load(B_ptr + state_rows + t, mask=state_in, other=0.0).to(tl.float32)
        C = tl.load(C_ptr + state_rows + t, mask=state_in, other=0.0).to(tl.float32)
        h = tl.exp(dt[:, None] * A) * h + (dt * u)[:, None] * B[None, :]
        y = tl.sum(h * C[None, :], axis=1)
        if HAS_D:
            y = y + skip * u
        if HAS_Z:
            z = tl.load(z_ptr + channel_rows + t, mask=channel_in, other=0.0).to(tl.float32)
            y = y * z * tl.sigmoid(z)
        tl.store(out_ptr + channel_rows + t, y.to(out_ptr.dtype.element_ty), mask=channel_in)


# Asked of the kernel itself: triton chose interpreting or compiling when the decorator above
# ran, according to TRITON_INTERPRET at that moment.
RUNS_IN_INTERPRETER: bool = isinstance(_selective_scan_kernel, InterpretedFunction)


def default_block_dim(dim: int, d_state: int) -> int:
    """Channels per program for ``dim`` channels and ``d_state`` states.

    >>> default_block_dim(640, 256), default_block_dim(40, 5), default_block_dim(3, 16)
    (16, 32, 4)
    """
    return max(1, min(triton.next_power_of_2(dim), MAX_BLOCK_DIM,
                      MAX_BLOCK_ELEMENTS // triton.next_power_of_2(d_state)))


def selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus: bool, block_dim: int | None) -> torch.Tensor:
    """Launch the kernel on validated inputs; returns ``(batch, dim, L)`` in ``u``'s dtype."""
    batch, dim, length = u.shape
    d_state = A.shape[1]
    block_dim = default_block_dim(dim, d_state) if block_dim is None else block_dim
    if block_dim < 1 or block_dim & (block_dim - 1):
        raise ValueError(f"block_dim must be a power of two, got {block_dim}")
    block_state = triton.next_power_of_2(d_state)
    u, delta, A, B, C = (t.contiguous() for t in (u, delta, A, B, C))
    D, z, delta_bias = (None if t is None else t.contiguous() for t in (D, z, delta_bias))
    out = torch.empty_like(u, memory_format=torch.contiguous_format)
    num_warps = max(1, min(8, block_dim * block_state // 512))
    device_guard = torch.cuda.device(u.device) if u.is_cuda else contextlib.nullcontext()
    with device_guard:
        _selective_scan_kernel[(batch, triton.cdiv(dim, block_dim))](
            u, delta, A, B, C,
            # Absent inputs are never read (their flag is off); u only fills the slot.
            u if D is None else D, u if z is None else z, u if delta_bias is None else delta_bias,
            out, dim, d_state, length,
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=delta_softplus,
            BLOCK_DIM=block_dim, BLOCK_STATE=block_state, num_warps=num_warps,
        )
    return out
