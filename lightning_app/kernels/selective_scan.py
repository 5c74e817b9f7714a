"""Mamba's selective scan (the S6 recurrence), in plain torch and as a Triton kernel.

For every batch row ``b``, channel ``d`` and state ``n``, over the sequence ``t = 0..L-1``::

    delta_t = softplus(delta[b, d, t] + delta_bias[d])        (softplus and bias optional)
    h_t[n]  = exp(delta_t * A[d, n]) * h_{t-1}[n] + delta_t * B[b, n, t] * u[b, d, t],   h_{-1} = 0
    y[b, d, t] = sum_n C[b, n, t] * h_t[n] + D[d] * u[b, d, t]
    y[b, d, t] *= silu(z[b, d, t])                           (gate optional)

The layout and arguments are those of ``mamba_ssm.ops.selective_scan_interface.selective_scan_ref``
(state-spaces/mamba, the version Mamba-FSCIL's official code vendors): ``u``, ``delta``, ``z`` are
``(batch, dim, L)``, ``A`` is ``(dim, N)``, ``B`` and ``C`` are ``(batch, N, L)`` (input-dependent:
the "selective" part), ``D`` and ``delta_bias`` are ``(dim,)``. Computed in fp32; the output has
``u``'s dtype.

Three entry points, as :mod:`reglab.kernels.soft_cross_entropy`:

* :func:`selective_scan_reference`: plain torch, any device, differentiable in every input (a
  Python loop over ``L``; ``L`` is short where reglab uses it: Mamba-FSCIL scans 4 tokens).
* :func:`selective_scan_triton`: one Triton program per (batch row, block of channels) carries
  the ``(block, N)`` state in registers through the sequence. **Forward only**: it returns no
  gradient, so it serves evaluation and feature passes (``torch.no_grad``), and forcing it on an
  input that requires grad raises. Why no backward kernel: the reverse scan would have to
  recompute or store every ``h_t`` and reduce the gradients of ``A``, ``B``, ``C``, ``D`` across
  programs; reglab's scans are a few tokens long, where training through the reference is cheap.
* :func:`selective_scan`: the dispatcher. ``"auto"`` takes the kernel for CUDA inputs when triton
  is installed and no input needs a gradient, the reference otherwise (always on CPU).

Example::

    >>> import torch
    >>> from reglab.kernels import selective_scan
    >>> u = torch.ones(1, 1, 2)                      # one channel, two steps
    >>> delta = torch.ones(1, 1, 2)
    >>> A = torch.tensor([[-1.0]])                   # one state
    >>> B = C = torch.ones(1, 1, 2)
    >>> selective_scan(u, delta, A, B, C)           # h_0 = 1, h_1 = e^-1 * 1 + 1
    tensor([[[1.0000, 1.3679]]])
"""

from __future__ import annotations

import functools
from types import ModuleType
from typing import Literal

import torch
import torch.nn.functional as F

Implementation = Literal["auto", "triton", "torch"]
_IMPLEMENTATIONS = ("auto", "triton", "torch")


def _validate_inputs(u, delta, A, B, C, D, z, delta_bias) -> None:
    if u.dim() != 3:
        raise ValueError(f"u must be 3-D (batch, dim, length); got shape {tuple(u.shape)}")
    batch, dim, length = u.shape
    if length == 0 or batch == 0 or dim == 0:
        raise ValueError(f"u must be non-empty; got shape {tuple(u.shape)}")
    if A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"A must be (dim, d_state) = ({dim}, N); got shape {tuple(A.shape)}")
    expected = {"delta": (u.shape, delta), "B": ((batch, A.shape[1], length), B), "C": ((batch, A.shape[1], length), C)}
    if z is not None:
        expected["z"] = (u.shape, z)
    for name, (shape, tensor) in expected.items():
        if tuple(tensor.shape) != tuple(shape):
            raise ValueError(f"{name} must have shape {tuple(shape)} for u of shape {tuple(u.shape)} and A of shape "
                             f"{tuple(A.shape)}; got {tuple(tensor.shape)}")
    for name, vector in (("D", D), ("delta_bias", delta_bias)):
        if vector is not None and tuple(vector.shape) != (dim,):
            raise ValueError(f"{name} must have shape ({dim},); got {tuple(vector.shape)}")
    tensors = [t for t in (u, delta, A, B, C, D, z, delta_bias) if t is not None]
    if not all(t.is_floating_point() for t in tensors):
        raise TypeError(f"every input must be floating point; got {[t.dtype for t in tensors]}")
    if len({t.device for t in tensors}) != 1:
        raise ValueError(f"every input must be on one device; got {sorted({str(t.device) for t in tensors})}")


def selective_scan_reference(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
) -> torch.Tensor:
    """The selective scan in plain torch (module docstring), fp32 (or fp64) inside, ``u``'s dtype out.

    Differentiable in every input. Holds one ``(batch, dim, N)`` state per step (the official
    reference materialises ``exp(delta A)`` for all steps at once, ``(batch, dim, L, N)``).

    Example::

        >>> u, delta = torch.randn(2, 3, 5), torch.rand(2, 3, 5)
        >>> A, B, C = -torch.rand(3, 4), torch.randn(2, 4, 5), torch.randn(2, 4, 5)
        >>> selective_scan_reference(u, delta, A, B, C, D=torch.ones(3)).shape
        torch.Size([2, 3, 5])
    """
    _validate_inputs(u, delta, A, B, C, D, z, delta_bias)
    # fp32 at least (fp64 stays fp64, so gradcheck can check the reference)
    compute = torch.promote_types(u.dtype, torch.float32)
    u_f, delta_f, A_f, B_f, C_f = (t.to(compute) for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta_f = delta_f + delta_bias.to(compute)[:, None]
    if delta_softplus:
        delta_f = F.softplus(delta_f)  # threshold 20 as the CUDA and Triton kernels
    state = u_f.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    outputs = []
    for t in range(u.shape[2]):
        step = delta_f[:, :, t, None]
        state = torch.exp(step * A_f) * state + step * B_f[:, None, :, t] * u_f[:, :, t, None]
        outputs.append((state * C_f[:, None, :, t]).sum(-1))
    y = torch.stack(outputs, dim=-1)
    if D is not None:
        y = y + D.to(compute)[:, None] * u_f
    if z is not None:
        y = y * F.silu(z.to(compute))
    return y.to(u.dtype)


@functools.cache
def _load_triton_backend() -> ModuleType | None:
    """Import the Triton kernel module on first use; None when triton is missing."""
    try:
        from reglab.kernels import _selective_scan_triton
    except ImportError:
        return None
    return _selective_scan_triton


def _needs_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def selective_scan_triton(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    *,
    block_dim: int | None = None,
) -> torch.Tensor:
    """The selective scan as one Triton kernel (forward only; same maths as the reference).

    Needs CUDA tensors, or CPU tensors with ``TRITON_INTERPRET=1`` set before the first call into
    Triton in the process (the interpreter has no bf16). Raises if an input requires grad while
    grad mode is on: the kernel has no backward.

    Args:
        block_dim: channels per program, a power of two; defaults to
            ``min(next_power_of_2(dim), 32, 4096 // next_power_of_2(N))`` (at least 1).
        Other arguments: as in :func:`selective_scan_reference`.

    Example (CPU, interpreter)::

        $ TRITON_INTERPRET=1 python -c "
        import torch
        from reglab.kernels import selective_scan_triton
        u, delta, A = torch.randn(2, 40, 6), torch.rand(2, 40, 6), -torch.rand(40, 5)
        B, C = torch.randn(2, 5, 6), torch.randn(2, 5, 6)
        print(selective_scan_triton(u, delta, A, B, C, block_dim=16).shape)"
    """
    _validate_inputs(u, delta, A, B, C, D, z, delta_bias)
    backend = _load_triton_backend()
    if backend is None:
        raise RuntimeError("the Triton implementation needs the `triton` package (pip install reglab[triton])")
    tensors = [t for t in (u, delta, A, B, C, D, z, delta_bias) if t is not None]
    if any(t.dtype not in backend.SUPPORTED_DTYPES for t in tensors):
        raise TypeError(f"the Triton implementation supports fp32, fp16 and bf16; got {[t.dtype for t in tensors]}")
    if not (u.is_cuda or backend.RUNS_IN_INTERPRETER):
        raise RuntimeError(
            f"the Triton implementation needs CUDA tensors (got {u.device}); for CPU tensors set "
            "TRITON_INTERPRET=1 before the first Triton call in the process, or use implementation='torch'"
        )
    if _needs_grad(*tensors):
        raise ValueError(
            "the Triton selective scan is forward-only and cannot return gradients; call it under "
            "torch.no_grad() (evaluation) or use implementation='torch' (the differentiable reference)"
        )
    return backend.selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, block_dim)


def _triton_is_the_fast_path(tensors: list[torch.Tensor]) -> bool:
    if not tensors[0].is_cuda or _needs_grad(*tensors):
        return False
    backend = _load_triton_backend()
    # The interpreter is a debugging aid, never faster than torch.
    return (backend is not None and not backend.RUNS_IN_INTERPRETER
            and all(t.dtype in backend.SUPPORTED_DTYPES for t in tensors))


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    implementation: Implementation = "auto",
) -> torch.Tensor:
    """The selective scan through the fastest implementation that can serve the call.

    ``"auto"``: the Triton kernel for CUDA inputs in fp32/fp16/bf16 when triton is installed and
    no input needs a gradient (evaluation, ``torch.no_grad``); :func:`selective_scan_reference`
    otherwise (CPU, a missing triton, training). ``"triton"`` or ``"torch"`` force one; forcing
    ``"triton"`` raises instead of falling back, and works on CPU under ``TRITON_INTERPRET=1``.

    Example::

        >>> u = torch.randn(1, 4, 3, requires_grad=True)
        >>> y = selective_scan(u, torch.rand(1, 4, 3), -torch.rand(4, 2), torch.randn(1, 2, 3), torch.randn(1, 2, 3))
        >>> y.sum().backward()  # on CPU (or with grad) this is the reference
        >>> u.grad.shape
        torch.Size([1, 4, 3])
    """
    if implementation not in _IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {_IMPLEMENTATIONS}; got {implementation!r}")
    arguments = (u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    tensors = [t for t in arguments[:-1] if t is not None]
    if implementation == "triton" or (implementation == "auto" and _triton_is_the_fast_path(tensors)):
        return selective_scan_triton(*arguments)
    return selective_scan_reference(*arguments)
