"""Benchmark the fused Triton soft cross-entropy against the torch reference.

For each class count, both implementations run forward + backward on the same
inputs (``N`` rows, student logits requiring grad, detached teacher
probabilities in the same dtype). The script reports, all measured in one run:

* median forward+backward time over ``--repeats`` runs after ``--warmup`` runs,
  timed with CUDA events;
* peak memory above the inputs (``torch.cuda.max_memory_allocated`` after a
  reset, minus what was allocated before the step), gradient included;
* the Triton path's achieved bandwidth, counting the 7 passes over an ``N x C``
  tensor its design needs (logits and targets read twice, gradient written in
  forward, then read and written once by backward's in-place scaling);
* how far the two implementations' loss and gradient are apart.

Needs a CUDA GPU; on a machine without one it exits with a message.

Example::

    python benchmarks/kernel_soft_cross_entropy.py --device cuda --dtype bf16 \\
        --rows 8192 --classes 1000 32000 128000
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
from typing import Callable

import torch

from reglab.kernels import soft_cross_entropy_reference, soft_cross_entropy_triton

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
PASSES_OVER_LOGITS_SIZED_TENSORS = 7
MIB = 2**20

LossFunction = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="CUDA device to run on (default: cuda)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="dtype of logits and targets")
    parser.add_argument("--rows", type=int, default=8192, help="N, rows per batch (default: 8192)")
    parser.add_argument(
        "--classes", type=int, nargs="+", default=[1000, 32000, 128000], help="class counts C to measure"
    )
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--kl", action="store_true", help="measure KL (subtract_target_entropy=True)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed runs first (compilation, caches)")
    parser.add_argument("--repeats", type=int, default=20, help="timed runs; the median is reported")
    parser.add_argument("--block-size", type=int, default=None, help="override the kernel's block size")
    parser.add_argument("--num-warps", type=int, default=None, help="override the kernel's warps per program")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def make_inputs(
    rows: int, classes: int, dtype: torch.dtype, device: torch.device, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator(device=device).manual_seed(seed)
    logits = torch.randn(rows, classes, device=device, generator=generator).to(dtype).requires_grad_()
    teacher_logits = torch.randn(rows, classes, device=device, generator=generator)
    targets = torch.softmax(teacher_logits, dim=-1).to(dtype)
    return logits, targets


def forward_backward(
    loss_function: LossFunction, logits: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    # A fresh .grad each time, so neither implementation gets to accumulate
    # into a buffer left over from the previous run.
    logits.grad = None
    loss = loss_function(logits, targets)
    loss.backward()
    return loss.detach()


def median_milliseconds(step: Callable[[], object], warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        step()
    events = [
        (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)
    ]
    for start, end in events:
        start.record()
        step()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events)


def peak_extra_mib(step: Callable[[], object], device: torch.device) -> float:
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    allocated_before = torch.cuda.memory_allocated(device)
    step()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - allocated_before) / MIB


def measure_class_count(args: argparse.Namespace, classes: int, device: torch.device) -> str:
    """Return one markdown table row for ``classes``."""
    dtype = DTYPES[args.dtype]
    options = dict(temperature=args.temperature, subtract_target_entropy=args.kl)
    implementations: dict[str, LossFunction] = {
        "torch": functools.partial(soft_cross_entropy_reference, **options),
        "triton": functools.partial(
            soft_cross_entropy_triton, block_size=args.block_size, num_warps=args.num_warps, **options
        ),
    }
    try:
        logits, targets = make_inputs(args.rows, classes, dtype, device, args.seed)
        milliseconds, peak_mib, losses, grads = {}, {}, {}, {}
        for name, loss_function in implementations.items():
            step = functools.partial(forward_backward, loss_function, logits, targets)
            losses[name] = step()
            grads[name] = logits.grad
            peak_mib[name] = peak_extra_mib(step, device)
            milliseconds[name] = median_milliseconds(step, args.warmup, args.repeats)
    except torch.cuda.OutOfMemoryError:
        return f"| {classes} | out of memory |" + " |" * 8
    finally:
        torch.cuda.empty_cache()

    loss_difference = (losses["triton"] - losses["torch"]).abs().item()
    grad_difference = (
        (grads["triton"].float() - grads["torch"].float()).abs().max() / grads["torch"].float().abs().max()
    ).item()
    moved_bytes = PASSES_OVER_LOGITS_SIZED_TENSORS * args.rows * classes * dtype.itemsize
    triton_bandwidth = moved_bytes / (milliseconds["triton"] * 1e-3) / 1e9
    return (
        f"| {classes} | {milliseconds['torch']:.3f} | {milliseconds['triton']:.3f} "
        f"| {milliseconds['torch'] / milliseconds['triton']:.2f}x "
        f"| {peak_mib['torch']:.0f} | {peak_mib['triton']:.0f} "
        f"| {peak_mib['torch'] / peak_mib['triton']:.2f}x "
        f"| {triton_bandwidth:.0f} | {loss_difference:.2e} | {grad_difference:.2e} |"
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not torch.cuda.is_available() or not args.device.startswith("cuda"):
        sys.exit(
            f"this benchmark needs a CUDA GPU (asked for device {args.device!r}, "
            f"torch.cuda.is_available() is {torch.cuda.is_available()}); run it on a GPU machine"
        )
    device = torch.device(args.device)
    torch.cuda.set_device(device)
    mode = "KL" if args.kl else "soft cross-entropy"
    print(
        f"{mode}, {torch.cuda.get_device_name(device)}, {args.dtype}, N={args.rows}, T={args.temperature}, "
        f"block_size={args.block_size or 'default'}, num_warps={args.num_warps or 'default'}, "
        f"median of {args.repeats} after {args.warmup} warm-up runs, torch {torch.__version__}\n"
    )
    print(
        "| C | torch fwd+bwd ms | triton fwd+bwd ms | speedup | torch peak MiB | triton peak MiB "
        "| memory ratio | triton GB/s | abs loss diff | max grad diff / max grad |"
    )
    print("|---:" * 10 + "|")
    for classes in args.classes:
        print(measure_class_count(args, classes, device), flush=True)


if __name__ == "__main__":
    main()
