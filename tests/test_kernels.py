"""Tests for reglab.kernels.soft_cross_entropy.

The Triton kernel is exercised on CPU through triton's interpreter, in one
subprocess that runs this file as a script with TRITON_INTERPRET=1
(tests/triton_interpreter.py); the parametrised test asserts each check's verdict. bf16 is absent from the interpreter checks
because the interpreter computes with numpy, which has no bf16: the CUDA test
at the end covers bf16 (and default block sizes) when a GPU is present.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import math
import os
from pathlib import Path
from typing import Callable, Literal

import pytest
import triton_interpreter
import torch
import torch.nn.functional as F

from reglab.kernels import soft_cross_entropy, soft_cross_entropy_reference, soft_cross_entropy_triton

REPO_ROOT = Path(__file__).resolve().parents[1]

# Small enough for the interpreter, and 3 * 16 + 7 classes make every row span
# four blocks, the last one partly masked.
SMALL_BLOCK = 16
MULTI_BLOCK_CLASSES = 3 * SMALL_BLOCK + 7

# Relative precision of one rounding to each dtype, doubled: the kernel rounds
# the gradient when storing it and again when backward scales it.
GRAD_RTOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
# Both implementations accumulate the loss in fp32 from identical inputs.
LOSS_RTOL = 1e-5


@dataclasses.dataclass(frozen=True)
class KernelCase:
    """One comparison of the Triton path against the reference."""

    dtype: torch.dtype = torch.float32
    num_rows: int = 5
    num_classes: int = MULTI_BLOCK_CLASSES
    block_size: int | None = SMALL_BLOCK
    temperature: float = 1.0
    reduction: Literal["mean", "sum", "none"] = "mean"
    subtract_target_entropy: bool = False
    # "unnormalised" rows sum to 0.7, so the gradient's sum_k t_k factor matters.
    targets: Literal["soft", "one_hot", "unnormalised"] = "soft"
    # "ascending" puts each row's largest logits in its last block, so the
    # online softmax must rescale its running sum at every block.
    logits: Literal["random", "ascending"] = "random"
    # "row_slice" has a row stride larger than the row; "transposed" is not
    # contiguous in the class dimension and has to be copied.
    layout: Literal["contiguous", "row_slice", "transposed"] = "contiguous"
    logits_require_grad: bool = True
    through_dispatcher: bool = False
    # Sets the masked classes' logits to -inf and their targets to 0, as ClassificationModule's
    # active_classes does: the whole first block (the online softmax starts from an all -inf
    # block) and every fifth class after it.
    masked_classes: bool = False


def class_mask(num_classes: int) -> torch.Tensor:
    """True for the classes a masked case sets to -inf (see KernelCase.masked_classes)."""
    classes = torch.arange(num_classes)
    return (classes < SMALL_BLOCK) | (classes % 5 == 0)


def _make_inputs(case: KernelCase, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    shape = (case.num_rows, case.num_classes)
    if case.logits == "ascending":
        ramp = torch.linspace(-8.0, 8.0, case.num_classes).expand(shape)
        logits = ramp + 0.1 * torch.randn(shape, generator=generator)
    else:
        logits = 3.0 * torch.randn(shape, generator=generator)
    if case.targets == "one_hot":
        labels = torch.randint(case.num_classes, (case.num_rows,), generator=generator)
        targets = F.one_hot(labels, case.num_classes).float()
    else:
        targets = torch.softmax(2.0 * torch.randn(shape, generator=generator), dim=-1)
        if case.targets == "unnormalised":
            targets = 0.7 * targets
    if case.masked_classes:
        masked = class_mask(case.num_classes)
        logits = logits.masked_fill(masked, float("-inf"))
        targets = targets.masked_fill(masked, 0.0)
        targets = targets / targets.sum(-1, keepdim=True)

    def lay_out(tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.to(device=device, dtype=case.dtype)
        if case.layout == "row_slice":
            padded = torch.zeros(case.num_rows, case.num_classes + 5, dtype=case.dtype, device=device)
            padded[:, : case.num_classes] = tensor
            return padded[:, : case.num_classes]
        if case.layout == "transposed":
            return tensor.t().contiguous().t()
        return tensor

    return lay_out(logits), lay_out(targets)


def check_kernel_against_reference(case: KernelCase, device: str) -> None:
    """Assert that loss and logits gradient of the Triton path match the reference."""
    logits, targets = _make_inputs(case, device)
    options = dict(
        temperature=case.temperature,
        reduction=case.reduction,
        subtract_target_entropy=case.subtract_target_entropy,
    )
    kernel_logits = logits.detach().requires_grad_(case.logits_require_grad)
    reference_logits = logits.detach().clone().requires_grad_(case.logits_require_grad)
    if case.through_dispatcher:
        kernel_loss = soft_cross_entropy(kernel_logits, targets, implementation="triton", **options)
    else:
        kernel_loss = soft_cross_entropy_triton(kernel_logits, targets, block_size=case.block_size, **options)
    reference_loss = soft_cross_entropy_reference(reference_logits, targets, **options)

    assert kernel_loss.dtype == torch.float32
    torch.testing.assert_close(
        kernel_loss, reference_loss, rtol=LOSS_RTOL, atol=LOSS_RTOL * reference_loss.abs().max().item()
    )
    if not case.logits_require_grad:
        assert kernel_loss.grad_fn is None
        return

    # A non-unit upstream gradient checks that backward really scales by it.
    if case.reduction == "none":
        upstream = torch.rand(case.num_rows, generator=torch.Generator().manual_seed(1)).to(device) + 0.5
    else:
        upstream = torch.tensor(3.7, device=device)
    kernel_loss.backward(upstream)
    reference_loss.backward(upstream)
    assert kernel_logits.grad.dtype == case.dtype
    expected = reference_logits.grad.float()
    rtol = GRAD_RTOL[case.dtype]
    torch.testing.assert_close(
        kernel_logits.grad.float(), expected, rtol=rtol, atol=rtol * expected.abs().max().item()
    )


def check_forced_triton_rejects_targets_that_require_grad(device: str) -> None:
    logits = torch.randn(3, 20, device=device, requires_grad=True)
    targets = torch.softmax(torch.randn(3, 20, device=device), dim=-1).requires_grad_()
    with pytest.raises(ValueError, match="detach"):
        soft_cross_entropy(logits, targets, implementation="triton")


INTERPRETER_CHECKS: dict[str, Callable[[str], None]] = {
    name: functools.partial(check_kernel_against_reference, case)
    for name, case in {
        "fp32_multi_block": KernelCase(),
        "fp16_multi_block": KernelCase(dtype=torch.float16),
        "fp32_online_max_moves_every_block": KernelCase(logits="ascending"),
        "fp32_one_hot_targets": KernelCase(targets="one_hot"),
        "fp32_targets_not_summing_to_one": KernelCase(targets="unnormalised", temperature=2.0),
        "fp16_temperature_sum": KernelCase(dtype=torch.float16, temperature=2.5, reduction="sum"),
        "fp32_temperature_none_random_upstream": KernelCase(temperature=0.5, reduction="none"),
        "fp16_none_random_upstream": KernelCase(dtype=torch.float16, reduction="none"),
        "fp32_kl_temperature": KernelCase(subtract_target_entropy=True, temperature=4.0),
        "fp32_kl_one_hot_none": KernelCase(subtract_target_entropy=True, targets="one_hot", reduction="none"),
        "fp16_kl_sum": KernelCase(dtype=torch.float16, subtract_target_entropy=True, reduction="sum"),
        "fp32_row_slice_view": KernelCase(layout="row_slice"),
        "fp32_transposed_input": KernelCase(layout="transposed"),
        "fp32_block_wider_than_row": KernelCase(block_size=128),
        "fp32_single_class": KernelCase(num_classes=1),
        "fp32_no_grad_loss_only": KernelCase(logits_require_grad=False, reduction="none"),
        "fp32_masked_classes": KernelCase(masked_classes=True),
        "fp16_masked_classes_kl_temperature": KernelCase(
            dtype=torch.float16, masked_classes=True, subtract_target_entropy=True, temperature=2.0
        ),
        "fp32_masked_classes_ascending_none": KernelCase(masked_classes=True, logits="ascending", reduction="none"),
        "dispatcher_forced_triton_default_block": KernelCase(
            num_classes=70, block_size=None, through_dispatcher=True
        ),
    }.items()
}
INTERPRETER_CHECKS["forced_triton_rejects_targets_that_require_grad"] = (
    check_forced_triton_rejects_targets_that_require_grad
)


@pytest.fixture(scope="module")
def interpreter_verdicts() -> dict[str, str | None]:
    return triton_interpreter.verdicts(__file__)


@pytest.mark.parametrize("check_name", list(INTERPRETER_CHECKS))
def test_triton_kernel_in_interpreter(check_name: str, interpreter_verdicts: dict[str, str | None]) -> None:
    failure = interpreter_verdicts[check_name]
    assert failure is None, failure


@pytest.mark.skipif(
    not (torch.cuda.is_available() and triton_interpreter.TRITON_INSTALLED), reason="needs a CUDA GPU and triton"
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("num_classes", [1000, 32000 + 7], ids=lambda c: f"C{c}")
@pytest.mark.parametrize(
    "options",
    [dict(), dict(subtract_target_entropy=True, temperature=2.0, reduction="none"), dict(masked_classes=True)],
    ids=["ce_mean", "kl_none", "masked_ce_mean"],
)
def test_triton_kernel_on_cuda_with_default_launch_config(
    dtype: torch.dtype, num_classes: int, options: dict
) -> None:
    check_kernel_against_reference(
        KernelCase(dtype=dtype, num_rows=64, num_classes=num_classes, block_size=None, **options), "cuda"
    )


@pytest.mark.parametrize("temperature", [1.0, 3.0])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reference_matches_torch_cross_entropy_with_soft_targets(temperature: float, reduction: str) -> None:
    logits = torch.randn(6, 11)
    targets = torch.softmax(torch.randn(6, 11), dim=-1)
    expected = F.cross_entropy(logits / temperature, targets, reduction=reduction)
    actual = soft_cross_entropy_reference(logits, targets, temperature=temperature, reduction=reduction)
    torch.testing.assert_close(actual, expected)


@pytest.mark.parametrize("subtract_target_entropy", [False, True], ids=["ce", "kl"])
def test_reference_skips_masked_classes_like_a_loss_over_the_active_ones(subtract_target_entropy: bool) -> None:
    num_classes = MULTI_BLOCK_CLASSES
    active = ~class_mask(num_classes)
    logits = torch.randn(4, num_classes)
    targets = torch.softmax(torch.randn(4, num_classes).masked_fill(~active, float("-inf")), dim=-1)
    masked_logits = logits.masked_fill(~active, float("-inf")).requires_grad_()
    loss = soft_cross_entropy_reference(
        masked_logits, targets, temperature=2.0, subtract_target_entropy=subtract_target_entropy
    )
    loss.backward()
    # The same loss computed on the active columns only, where nothing is infinite.
    active_logits = logits[:, active].clone().requires_grad_()
    expected = F.cross_entropy(active_logits / 2.0, targets[:, active])
    if subtract_target_entropy:
        expected = expected + torch.xlogy(targets[:, active], targets[:, active]).sum(-1).mean()
    expected.backward()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(masked_logits.grad[:, active], active_logits.grad)
    assert (masked_logits.grad[:, ~active] == 0).all()


def test_reference_is_infinite_when_targets_put_mass_on_a_masked_class() -> None:
    logits = torch.tensor([[0.0, float("-inf"), 1.0]])
    assert soft_cross_entropy_reference(logits, torch.tensor([[0.5, 0.5, 0.0]])).isinf()


def test_reference_with_one_hot_targets_matches_hard_label_cross_entropy() -> None:
    logits = torch.randn(7, 9)
    labels = torch.randint(9, (7,))
    actual = soft_cross_entropy_reference(logits, F.one_hot(labels, 9).float(), temperature=2.0)
    torch.testing.assert_close(actual, F.cross_entropy(logits / 2.0, labels))


def test_reference_kl_is_non_negative_and_matches_torch_kl_div() -> None:
    logits = 4.0 * torch.randn(32, 10)
    targets = torch.softmax(torch.randn(32, 10), dim=-1)
    row_kl = soft_cross_entropy_reference(
        logits, targets, temperature=2.0, reduction="none", subtract_target_entropy=True
    )
    assert (row_kl >= 0).all()
    expected = F.kl_div(torch.log_softmax(logits / 2.0, dim=-1), targets, reduction="batchmean")
    torch.testing.assert_close(row_kl.mean(), expected)


def test_reference_kl_is_zero_when_targets_are_the_tempered_softmax() -> None:
    logits = torch.randn(5, 8)
    # exp() underflows some probabilities to exactly 0, exercising 0 * log 0 = 0.
    logits[:, 0] = -200.0
    targets = torch.softmax(logits / 3.0, dim=-1)
    row_kl = soft_cross_entropy_reference(
        logits, targets, temperature=3.0, reduction="none", subtract_target_entropy=True
    )
    torch.testing.assert_close(row_kl, torch.zeros(5), atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_reference_computes_in_fp32_for_half_inputs(dtype: torch.dtype) -> None:
    logits = torch.randn(4, 6)
    targets = torch.softmax(torch.randn(4, 6), dim=-1)
    half_logits = logits.to(dtype).requires_grad_()
    loss = soft_cross_entropy_reference(half_logits, targets.to(dtype))
    assert loss.dtype == torch.float32
    fp32_loss = soft_cross_entropy_reference(logits.to(dtype).float(), targets.to(dtype).float())
    torch.testing.assert_close(loss, fp32_loss)
    loss.backward()
    assert half_logits.grad.dtype == dtype


def test_reference_mean_divides_by_the_number_of_rows() -> None:
    logits = torch.randn(5, 7)
    targets = torch.softmax(torch.randn(5, 7), dim=-1)
    row_losses = soft_cross_entropy_reference(logits, targets, reduction="none")
    assert row_losses.shape == (5,)
    summed = soft_cross_entropy_reference(logits, targets, reduction="sum")
    torch.testing.assert_close(summed, row_losses.sum())
    torch.testing.assert_close(soft_cross_entropy_reference(logits, targets), row_losses.sum() / 5)


def test_auto_uses_the_reference_on_cpu_and_keeps_target_gradients() -> None:
    logits = torch.randn(3, 5, requires_grad=True)
    targets = torch.softmax(torch.randn(3, 5), dim=-1).requires_grad_()
    loss = soft_cross_entropy(logits, targets, temperature=2.0)
    torch.testing.assert_close(loss, soft_cross_entropy_reference(logits, targets, temperature=2.0))
    loss.backward()
    assert logits.grad is not None and targets.grad is not None


@pytest.mark.parametrize(
    ("logits_shape", "targets_shape", "kwargs", "error", "message"),
    [
        ((5,), (5,), {}, ValueError, "2-D"),
        ((2, 3, 4), (2, 3, 4), {}, ValueError, "2-D"),
        ((2, 3), (2, 4), {}, ValueError, "same shape"),
        ((0, 3), (0, 3), {}, ValueError, "at least one row"),
        ((2, 3), (2, 3), {"temperature": 0.0}, ValueError, "temperature"),
        ((2, 3), (2, 3), {"temperature": math.inf}, ValueError, "temperature"),
        ((2, 3), (2, 3), {"reduction": "batchmean"}, ValueError, "reduction"),
        ((2, 3), (2, 3), {"implementation": "cuda"}, ValueError, "implementation"),
    ],
)
def test_invalid_arguments_raise_clear_errors(logits_shape, targets_shape, kwargs, error, message) -> None:
    with pytest.raises(error, match=message):
        soft_cross_entropy(torch.randn(logits_shape), torch.rand(targets_shape), **kwargs)


def test_integer_targets_are_rejected() -> None:
    with pytest.raises(TypeError, match="floating point"):
        soft_cross_entropy(torch.randn(2, 3), torch.ones(2, 3, dtype=torch.long))


@pytest.mark.skipif(not triton_interpreter.TRITON_INSTALLED, reason="triton is not installed")
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="the interpreter accepts CPU tensors")
def test_forcing_triton_on_cpu_without_the_interpreter_raises() -> None:
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        soft_cross_entropy(torch.randn(2, 3), torch.rand(2, 3), implementation="triton")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown on machines without a GPU")
def test_benchmark_script_parses_arguments_and_asks_for_a_gpu() -> None:
    spec = importlib.util.spec_from_file_location(
        "kernel_soft_cross_entropy_benchmark", REPO_ROOT / "benchmarks" / "kernel_soft_cross_entropy.py"
    )
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    args = benchmark.parse_args(["--dtype", "fp16", "--classes", "1000", "32000", "--kl"])
    assert (args.dtype, args.classes, args.kl, args.rows) == ("fp16", [1000, 32000], True, 8192)
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        benchmark.main([])


if __name__ == "__main__":
    triton_interpreter.main(INTERPRETER_CHECKS)
