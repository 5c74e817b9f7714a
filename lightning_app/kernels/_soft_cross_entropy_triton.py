"""Triton backend of :func:`reglab.kernels.soft_cross_entropy`.

Kept in its own module so that importing :mod:`reglab.kernels` never
imports triton: the public module loads this one lazily, on the first call that
needs it. That also means ``TRITON_INTERPRET=1`` only has to be set before that
first call, because triton decides between compiling and interpreting when the
``@triton.jit`` decorator below runs. Call it through
:func:`reglab.kernels.soft_cross_entropy_triton`, which validates inputs.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable
from triton.runtime.interpreter import InterpretedFunction

from reglab.kernels.reductions import reduce_row_losses

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Each thread holds 8 values of every block-sized tensor: for bf16/fp16 that is
# one 16-byte load per tensor, and ptxas (sm_90a) then needs 40-64 registers per
# thread with no spills; 16 values per thread needed 80-170 registers, leaving
# far fewer threads resident per SM to hide memory latency. Rows longer than
# 4096 classes (16 warps) loop over several blocks instead of growing the block.
MAX_BLOCK_SIZE = 4096
ELEMENTS_PER_THREAD = 8
MAX_NUM_WARPS = 16


@triton.jit
def _soft_cross_entropy_kernel(
    logits_ptr,
    targets_ptr,
    grad_ptr,
    row_losses_ptr,
    logits_row_stride,
    targets_row_stride,
    grad_row_stride,
    num_classes,
    inverse_temperature,
    grad_scale,
    SUBTRACT_TARGET_ENTROPY: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    # int64 so that row * stride cannot overflow for N * C >= 2**31 elements.
    row = tl.program_id(0).to(tl.int64)
    logits_row = logits_ptr + row * logits_row_stride
    targets_row = targets_ptr + row * targets_row_stride
    grad_row = grad_ptr + row * grad_row_stride

    # Pass 1: online softmax. The running max is rescaled whenever a later block
    # holds a larger logit, so one read of the row gives its log-sum-exp. Masked
    # classes (-inf logits) can fill whole blocks: while no finite logit has been
    # seen the shift is 0 instead of -inf, so exp(-inf - shift) = 0, never
    # exp(-inf - -inf) = NaN.
    running_max = tl.full((), float("-inf"), tl.float32)
    running_sum_exp = tl.zeros((), tl.float32)
    target_mass = tl.zeros((), tl.float32)
    for block_start in range(0, num_classes, BLOCK_SIZE):
        offsets = block_start + tl.arange(0, BLOCK_SIZE)
        in_row = offsets < num_classes
        scaled_logits = (
            tl.load(logits_row + offsets, mask=in_row, other=float("-inf")).to(tl.float32)
            * inverse_temperature
        )
        targets = tl.load(targets_row + offsets, mask=in_row, other=0.0).to(tl.float32)
        new_max = tl.maximum(running_max, tl.max(scaled_logits, axis=0))
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        running_sum_exp = running_sum_exp * tl.exp(running_max - shift) + tl.sum(
            tl.exp(scaled_logits - shift), axis=0
        )
        running_max = new_max
        target_mass += tl.sum(targets, axis=0)
    log_sum_exp = running_max + tl.log(running_sum_exp)

    # Pass 2: the loss is summed per lane and reduced once after the loop; the
    # gradient is written now so that backward is a single multiplication.
    # Masked lanes load t = 0 and a finite logit, so they add exactly 0.
    loss_per_lane = tl.zeros((BLOCK_SIZE,), tl.float32)
    for block_start in range(0, num_classes, BLOCK_SIZE):
        offsets = block_start + tl.arange(0, BLOCK_SIZE)
        in_row = offsets < num_classes
        scaled_logits = (
            tl.load(logits_row + offsets, mask=in_row, other=0.0).to(tl.float32)
            * inverse_temperature
        )
        targets = tl.load(targets_row + offsets, mask=in_row, other=0.0).to(tl.float32)
        log_probs = scaled_logits - log_sum_exp
        # A zero target on a masked (-inf) logit adds 0, not 0 * -inf = NaN.
        target_log_probs = tl.where(targets == 0.0, 0.0, targets * log_probs)
        if SUBTRACT_TARGET_ENTROPY:
            # log(1) in place of log(0) makes 0 * log 0 count as 0 without ever
            # forming 0 * -inf; a negative target still yields NaN, as torch.xlogy
            # does in the reference.
            target_log_target = targets * tl.log(tl.where(targets == 0.0, 1.0, targets))
            loss_per_lane += target_log_target - target_log_probs
        else:
            loss_per_lane -= target_log_probs
        if COMPUTE_GRAD:
            # d/dz_c of -sum_k t_k log softmax(z/T)_k = (softmax(z/T)_c * sum_k t_k - t_c) / T;
            # the target entropy does not depend on z, so KL shares it.
            grad = (tl.exp(log_probs) * target_mass - targets) * (inverse_temperature * grad_scale)
            tl.store(grad_row + offsets, grad.to(grad_ptr.dtype.element_ty), mask=in_row)
    tl.store(row_losses_ptr + row, tl.sum(loss_per_lane, axis=0))


# Asked of the kernel itself: triton chose interpreting or compiling when the
# decorator above ran, according to TRITON_INTERPRET at that moment.
RUNS_IN_INTERPRETER: bool = isinstance(_soft_cross_entropy_kernel, InterpretedFunction)


def default_launch_config(num_classes: int) -> tuple[int, int]:
    """Return ``(block_size, num_warps)`` for rows of ``num_classes`` classes.

    >>> default_launch_config(1000), default_launch_config(128000)
    ((1024, 4), (4096, 16))
    """
    block_size = min(triton.next_power_of_2(num_classes), MAX_BLOCK_SIZE)
    num_warps = max(1, min(MAX_NUM_WARPS, block_size // (32 * ELEMENTS_PER_THREAD)))
    return block_size, num_warps


def _launch(
    logits: torch.Tensor,
    target_probs: torch.Tensor,
    temperature: float,
    subtract_target_entropy: bool,
    compute_grad: bool,
    grad_scale: float,
    block_size: int | None,
    num_warps: int | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run the kernel; return fp32 per-row losses and, if asked, the scaled gradient."""
    num_rows, num_classes = logits.shape
    default_block_size, default_num_warps = default_launch_config(num_classes)
    block_size = default_block_size if block_size is None else block_size
    num_warps = default_num_warps if num_warps is None else num_warps
    if block_size < 1 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two, got {block_size}")

    # The kernel walks rows through their stride, so only the class dimension
    # has to be dense; row-sliced views are used without a copy.
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    if target_probs.stride(-1) != 1:
        target_probs = target_probs.contiguous()

    row_losses = torch.empty(num_rows, dtype=torch.float32, device=logits.device)
    grad = torch.empty_like(logits, memory_format=torch.contiguous_format) if compute_grad else None
    # Triton launches on the current CUDA device, which need not hold the inputs.
    device_guard = torch.cuda.device(logits.device) if logits.is_cuda else contextlib.nullcontext()
    with device_guard:
        _soft_cross_entropy_kernel[(num_rows,)](
            logits,
            target_probs,
            # Never written when COMPUTE_GRAD is off; logits only fills the slot.
            grad if compute_grad else logits,
            row_losses,
            logits.stride(0),
            target_probs.stride(0),
            grad.stride(0) if compute_grad else 0,
            num_classes,
            1.0 / temperature,
            grad_scale,
            SUBTRACT_TARGET_ENTROPY=subtract_target_entropy,
            COMPUTE_GRAD=compute_grad,
            BLOCK_SIZE=block_size,
            num_warps=num_warps,
        )
    return row_losses, grad


class SoftCrossEntropyFunction(torch.autograd.Function):
    """Autograd wrapper: forward runs the kernel, backward rescales its gradient.

    The gradient is produced in the forward pass (already divided by N for
    ``reduction="mean"``) and stored in the logits' dtype, so backward only
    multiplies it by ``grad_output``. That multiplication is done in place on the
    saved buffer to avoid a second N x C allocation; as a consequence the graph
    can be backpropagated through once (``retain_graph=True`` followed by a
    second backward raises torch's in-place modification error) and double
    backward is not supported. Targets are constants: their gradient is None.
    """

    @staticmethod
    def forward(
        ctx,
        logits: torch.Tensor,
        target_probs: torch.Tensor,
        temperature: float,
        reduction: str,
        subtract_target_entropy: bool,
        block_size: int | None,
        num_warps: int | None,
    ) -> torch.Tensor:
        grad_scale = 1.0 / logits.shape[0] if reduction == "mean" else 1.0
        row_losses, grad = _launch(
            logits,
            target_probs,
            temperature,
            subtract_target_entropy,
            compute_grad=True,
            grad_scale=grad_scale,
            block_size=block_size,
            num_warps=num_warps,
        )
        ctx.save_for_backward(grad)
        return reduce_row_losses(row_losses, reduction)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: torch.Tensor):
        (grad_logits,) = ctx.saved_tensors
        # A scalar for mean/sum, one value per row for reduction="none".
        scale = grad_output.unsqueeze(-1) if grad_output.dim() == 1 else grad_output
        grad_logits.mul_(scale)
        return grad_logits, None, None, None, None, None, None


def soft_cross_entropy_triton(
    logits: torch.Tensor,
    target_probs: torch.Tensor,
    temperature: float,
    reduction: str,
    subtract_target_entropy: bool,
    block_size: int | None,
    num_warps: int | None,
) -> torch.Tensor:
    """Fused loss (and gradient when logits need one); inputs already validated."""
    if torch.is_grad_enabled() and logits.requires_grad:
        return SoftCrossEntropyFunction.apply(
            logits, target_probs, temperature, reduction, subtract_target_entropy, block_size, num_warps
        )
    # Evaluation: skip the N x C gradient buffer entirely.
    row_losses, _ = _launch(
        logits,
        target_probs,
        temperature,
        subtract_target_entropy,
        compute_grad=False,
        grad_scale=1.0,
        block_size=block_size,
        num_warps=num_warps,
    )
    return reduce_row_losses(row_losses, reduction)
