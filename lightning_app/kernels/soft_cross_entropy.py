"""Cross-entropy (or KL divergence) between logits and a target distribution.

This is the shared hot path of self-distillation techniques (PS-KD, mean
teacher, knowledge distillation): the student's logits ``z`` of shape
``(N, C)`` are scored against teacher probabilities ``t`` of the same shape::

    loss_row = -sum_c t_c * log_softmax(z / T)_c                 (soft cross-entropy)
    loss_row = sum_c t_c * log t_c - sum_c t_c * log_softmax(z / T)_c   (KL(t || softmax(z / T)))

KL is selected with ``subtract_target_entropy=True`` (it is the cross-entropy
minus the entropy of ``t``, with ``0 * log 0 = 0``), so both losses share one
code path and one gradient with respect to the logits.

Masked classes: a logit of ``-inf`` (``ClassificationModule.active_classes``
masks classes a continual-learning task has not shown yet this way) has
probability 0, and a target of 0 there contributes nothing: the term
``t_c * log_softmax(z)_c`` is taken as 0 when ``t_c = 0``, never ``0 * -inf =
NaN``. A positive target on a ``-inf`` logit gives an infinite loss, as it
should (the target puts mass where the model cannot).

Temperature convention: ``T`` only divides the logits. The Hinton et al.
``T**2`` factor that keeps gradient magnitudes comparable across temperatures
is *not* applied here; callers multiply the loss by ``T**2`` themselves. The
targets are used as given: soften the teacher with the same ``T`` before
passing its probabilities.

Three entry points:

* :func:`soft_cross_entropy_reference`: plain torch, any device, differentiable
  in both arguments.
* :func:`soft_cross_entropy_triton`: one fused Triton kernel that computes the
  loss and writes the gradient with respect to the logits in the same pass.
* :func:`soft_cross_entropy`: picks one of the two.

Example::

    >>> import torch
    >>> from reglab.kernels import soft_cross_entropy
    >>> logits = torch.tensor([[2.0, 0.0, -1.0]], requires_grad=True)
    >>> teacher_probs = torch.tensor([[0.7, 0.2, 0.1]])
    >>> loss = soft_cross_entropy(logits, teacher_probs, temperature=2.0)
    >>> round(loss.item(), 4)
    0.8144
    >>> loss.backward()
    >>> logits.grad.shape
    torch.Size([1, 3])
"""

from __future__ import annotations

import functools
import math
from types import ModuleType
from typing import Literal

import torch

from reglab.kernels.reductions import Reduction, reduce_row_losses

Implementation = Literal["auto", "triton", "torch"]

_REDUCTIONS = ("mean", "sum", "none")
_IMPLEMENTATIONS = ("auto", "triton", "torch")


def _validate_inputs(
    logits: torch.Tensor, target_probs: torch.Tensor, temperature: float, reduction: str
) -> None:
    if logits.dim() != 2:
        raise ValueError(
            f"logits must be 2-D (rows, classes); got shape {tuple(logits.shape)}. "
            "Flatten leading dimensions first, e.g. logits.flatten(0, -2)."
        )
    if target_probs.shape != logits.shape:
        raise ValueError(
            f"target_probs must have the same shape as logits; got {tuple(target_probs.shape)} "
            f"and {tuple(logits.shape)}"
        )
    if logits.numel() == 0:
        raise ValueError(f"logits must have at least one row and one class; got shape {tuple(logits.shape)}")
    if not (logits.is_floating_point() and target_probs.is_floating_point()):
        raise TypeError(
            f"logits and target_probs must be floating point; got {logits.dtype} and {target_probs.dtype}"
        )
    if target_probs.device != logits.device:
        raise ValueError(
            "logits and target_probs must be on the same device; "
            f"got {logits.device} and {target_probs.device}"
        )
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a positive finite number; got {temperature}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}; got {reduction!r}")


def soft_cross_entropy_reference(
    logits: torch.Tensor,
    target_probs: torch.Tensor,
    temperature: float = 1.0,
    reduction: Reduction = "mean",
    subtract_target_entropy: bool = False,
) -> torch.Tensor:
    """Soft-target cross-entropy (or KL) in plain torch, computed in fp32.

    Args:
        logits: ``(N, C)`` unnormalised scores, any floating dtype.
        target_probs: ``(N, C)`` target distribution per row (normally summing to 1).
        temperature: divides the logits; no ``T**2`` factor is applied.
        reduction: ``"mean"`` over rows, ``"sum"``, or ``"none"`` for ``(N,)`` losses.
        subtract_target_entropy: return ``KL(target || softmax(logits / T))`` instead.

    Returns:
        An fp32 tensor, whatever the input dtype. Differentiable in both arguments.

    Example::

        >>> logits = torch.zeros(2, 4)
        >>> uniform = torch.full((2, 4), 0.25)
        >>> round(soft_cross_entropy_reference(logits, uniform).item(), 6) == round(math.log(4), 6)
        True
        >>> soft_cross_entropy_reference(logits, uniform, subtract_target_entropy=True).abs().item() < 1e-6
        True
    """
    _validate_inputs(logits, target_probs, temperature, reduction)
    targets = target_probs.float()
    log_probs = torch.log_softmax(logits.float() / temperature, dim=-1)
    # Zero-target terms on masked (-inf) logits count as 0, not 0 * -inf = NaN. Only those are
    # replaced, so the gradient with respect to a zero target elsewhere stays -log_softmax.
    log_probs = log_probs.masked_fill((targets == 0) & torch.isneginf(log_probs), 0.0)
    row_losses = -(targets * log_probs).sum(dim=-1)
    if subtract_target_entropy:
        row_losses = row_losses + torch.xlogy(targets, targets).sum(dim=-1)
    return reduce_row_losses(row_losses, reduction)


@functools.cache
def _load_triton_backend() -> ModuleType | None:
    """Import the Triton kernel module on first use; None when triton is missing."""
    try:
        from reglab.kernels import _soft_cross_entropy_triton
    except ImportError:
        return None
    return _soft_cross_entropy_triton


def soft_cross_entropy_triton(
    logits: torch.Tensor,
    target_probs: torch.Tensor,
    temperature: float = 1.0,
    reduction: Reduction = "mean",
    subtract_target_entropy: bool = False,
    *,
    block_size: int | None = None,
    num_warps: int | None = None,
) -> torch.Tensor:
    """Fused Triton soft-target cross-entropy (or KL); same maths as the reference.

    One program handles one row, looping over the classes in ``block_size``
    chunks (online softmax in fp32), and writes the gradient with respect to the
    logits during the forward pass, in the logits' dtype (fp32, fp16 or bf16).
    Backward then only scales that buffer by the incoming gradient, in place,
    so the result can be backpropagated once and not differentiated twice.

    Targets are treated as constants: if ``target_probs`` requires grad while
    grad mode is on, this raises; detach them (teachers' outputs normally are)
    or use :func:`soft_cross_entropy_reference`. When the logits need no
    gradient (evaluation) only the loss is computed.

    Needs CUDA tensors, or CPU tensors with ``TRITON_INTERPRET=1`` set before the
    first call into Triton in the process (the interpreter has no bf16).

    Args:
        block_size: classes per chunk, a power of two; defaults to
            ``min(next_power_of_2(C), 4096)``.
        num_warps: warps per program; defaults to ``block_size / 256`` clamped to 1..16.
        Other arguments: as in :func:`soft_cross_entropy_reference`.

    Returns:
        An fp32 tensor: a scalar, or ``(N,)`` for ``reduction="none"``.

    Example (CPU, interpreter)::

        $ TRITON_INTERPRET=1 python -c "
        import torch
        from reglab.kernels import soft_cross_entropy_triton
        logits = torch.randn(4, 40, requires_grad=True)
        targets = torch.softmax(torch.randn(4, 40), dim=-1)
        loss = soft_cross_entropy_triton(logits, targets, temperature=2.0, block_size=16)
        loss.backward()
        print(loss.item(), logits.grad.shape)"
    """
    _validate_inputs(logits, target_probs, temperature, reduction)
    backend = _load_triton_backend()
    if backend is None:
        raise RuntimeError(
            "the Triton implementation needs the `triton` package (pip install reglab[triton])"
        )
    if logits.dtype not in backend.SUPPORTED_DTYPES:
        raise TypeError(f"the Triton implementation supports fp32, fp16 and bf16 logits; got {logits.dtype}")
    if not (logits.is_cuda or backend.RUNS_IN_INTERPRETER):
        raise RuntimeError(
            f"the Triton implementation needs CUDA tensors (got {logits.device}); for CPU tensors set "
            "TRITON_INTERPRET=1 before the first Triton call in the process, or use implementation='torch'"
        )
    if torch.is_grad_enabled() and target_probs.requires_grad:
        raise ValueError(
            "the Triton implementation treats target_probs as constants and cannot return their "
            "gradient; pass target_probs.detach() or use implementation='torch'"
        )
    return backend.soft_cross_entropy_triton(
        logits, target_probs, temperature, reduction, subtract_target_entropy, block_size, num_warps
    )


def _triton_is_the_fast_path(logits: torch.Tensor, target_probs: torch.Tensor) -> bool:
    if not logits.is_cuda or torch.is_grad_enabled() and target_probs.requires_grad:
        return False
    backend = _load_triton_backend()
    # The interpreter is a debugging aid, never faster than torch.
    return (
        backend is not None
        and not backend.RUNS_IN_INTERPRETER
        and logits.dtype in backend.SUPPORTED_DTYPES
    )


def soft_cross_entropy(
    logits: torch.Tensor,
    target_probs: torch.Tensor,
    temperature: float = 1.0,
    reduction: Reduction = "mean",
    subtract_target_entropy: bool = False,
    implementation: Implementation = "auto",
) -> torch.Tensor:
    """Soft-target cross-entropy (or KL) through the fastest available implementation.

    ``implementation="auto"`` uses the fused Triton kernel for CUDA logits in
    fp32/fp16/bf16 when triton is installed and the targets need no gradient,
    and :func:`soft_cross_entropy_reference` otherwise (CPU, a missing triton,
    or targets that require grad, which the kernel treats as constants).
    ``"triton"`` or ``"torch"`` force one; forcing ``"triton"`` raises instead of
    falling back, and works on CPU tensors under ``TRITON_INTERPRET=1``.

    Arguments and result: as in :func:`soft_cross_entropy_reference` (fp32 output;
    no ``T**2`` factor).

    Example::

        >>> logits = torch.randn(8, 10, requires_grad=True)
        >>> teacher_probs = torch.softmax(torch.randn(8, 10) / 4.0, dim=-1)
        >>> kl = soft_cross_entropy(logits, teacher_probs, temperature=4.0, subtract_target_entropy=True)
        >>> (kl * 4.0**2).backward()  # the caller applies T**2
        >>> bool(kl >= 0)
        True
    """
    if implementation not in _IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {_IMPLEMENTATIONS}; got {implementation!r}")
    use_triton = implementation == "triton" or (
        implementation == "auto" and _triton_is_the_fast_path(logits, target_probs)
    )
    if use_triton:
        return soft_cross_entropy_triton(
            logits, target_probs, temperature, reduction, subtract_target_entropy
        )
    return soft_cross_entropy_reference(logits, target_probs, temperature, reduction, subtract_target_entropy)
