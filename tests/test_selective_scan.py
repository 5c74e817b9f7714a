"""Tests for reglab.kernels.selective_scan: the reference against a hand-computed scan, the Triton
kernel against the reference under triton's interpreter (one subprocess with TRITON_INTERPRET=1,
as tests/test_kernels.py), and on CUDA in fp32 and bf16 when a GPU is present."""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from pathlib import Path
from typing import Callable

import pytest
import triton_interpreter
import torch

from reglab.kernels import selective_scan, selective_scan_reference, selective_scan_triton

REPO_ROOT = Path(__file__).resolve().parents[1]
# Both accumulate in fp32 from the same inputs; the output is rounded once to its dtype. fp32: the
# GPU's exp is an approximation (relative error ~2^-22) compounded over long scans.
RTOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def two_step_example(gate: bool):
    """dim 1, two states, two steps, with D, and optionally the gate z; returns inputs and the
    output worked out by hand below."""
    u = torch.tensor([[[2.0, -1.0]]])
    delta = torch.tensor([[[0.5, 1.0]]])
    A = torch.tensor([[-1.0, -2.0]])
    B = torch.tensor([[[1.0, 2.0], [0.5, -1.0]]])  # B[:, n, t]
    C = torch.tensor([[[1.0, 0.5], [1.0, 2.0]]])
    D = torch.tensor([0.3])
    z = torch.tensor([[[0.0, 1.0]]]) if gate else None
    # t = 0: h = delta*u*B = 0.5*2*(1, 0.5) = (1, 0.5);             y = 1 + 0.5 + 0.3*2 = 2.1
    # t = 1: h = (e^-1*1 + 1*(-1)*2, e^-2*0.5 + 1*(-1)*(-1));        y = 0.5 h_0 + 2 h_1 + 0.3*(-1)
    h1 = (math.exp(-1.0) - 2.0, 0.5 * math.exp(-2.0) + 1.0)
    y = torch.tensor([[[2.1, 0.5 * h1[0] + 2.0 * h1[1] - 0.3]]])
    if gate:
        y = y * torch.tensor([[[0.0, 1.0 / (1.0 + math.exp(-1.0))]]])  # silu(0) = 0, silu(1) = sigmoid(1)
    return (u, delta, A, B, C, D, z), y


@pytest.mark.parametrize("gate", [False, True], ids=["no_gate", "gate"])
def test_reference_matches_the_scan_worked_out_by_hand(gate: bool) -> None:
    inputs, expected = two_step_example(gate)
    torch.testing.assert_close(selective_scan_reference(*inputs), expected)


def test_reference_bias_and_softplus_transform_delta_before_the_scan() -> None:
    (u, delta, A, B, C, D, z), _ = two_step_example(gate=False)
    bias = torch.tensor([0.7])
    # softplus(x + 0.7) = delta  <=>  x = log(e^delta - 1) - 0.7
    raw = torch.log(torch.expm1(delta)) - bias
    torch.testing.assert_close(
        selective_scan_reference(u, raw, A, B, C, D, delta_bias=bias, delta_softplus=True),
        selective_scan_reference(u, delta, A, B, C, D),
    )


def test_reference_gradients_match_finite_differences() -> None:
    generator = torch.Generator().manual_seed(0)
    shapes = [(2, 3, 4), (2, 3, 4), (3, 2), (2, 2, 4), (2, 2, 4), (3,), (2, 3, 4), (3,)]
    inputs = [torch.randn(shape, generator=generator, dtype=torch.float64).requires_grad_() for shape in shapes]
    inputs[2] = (-torch.rand(3, 2, generator=generator, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(lambda *x: selective_scan_reference(*x, delta_softplus=True), inputs)


def test_reference_keeps_the_input_dtype_and_computes_in_fp32() -> None:
    generator = torch.Generator().manual_seed(1)
    u, delta = torch.randn(2, 4, 3, generator=generator), torch.rand(2, 4, 3, generator=generator)
    A, B, C = -torch.rand(4, 5, generator=generator), torch.randn(2, 5, 3, generator=generator), torch.randn(2, 5, 3, generator=generator)
    half = selective_scan_reference(u.bfloat16(), delta.bfloat16(), A, B.bfloat16(), C.bfloat16())
    assert half.dtype == torch.bfloat16
    fp32 = selective_scan_reference(u.bfloat16().float(), delta.bfloat16().float(), A, B.bfloat16().float(), C.bfloat16().float())
    torch.testing.assert_close(half, fp32.bfloat16())


def test_dispatcher_uses_the_reference_on_cpu_and_keeps_gradients() -> None:
    (u, delta, A, B, C, D, z), _ = two_step_example(gate=True)
    u = u.clone().requires_grad_()
    y = selective_scan(u, delta, A, B, C, D, z)
    torch.testing.assert_close(y, selective_scan_reference(u, delta, A, B, C, D, z))
    y.sum().backward()
    assert u.grad is not None and u.grad.ne(0).any()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(u=torch.zeros(2, 3)), "3-D"),
        (dict(A=torch.zeros(4, 2)), "A must be"),
        (dict(B=torch.zeros(1, 3, 2)), "B must have shape"),
        (dict(z=torch.zeros(1, 1, 3)), "z must have shape"),
        (dict(D=torch.zeros(2)), "D must have shape"),
        (dict(implementation="cuda"), "implementation"),
    ],
)
def test_invalid_arguments_raise_clear_errors(change: dict, message: str) -> None:
    (u, delta, A, B, C, D, z), _ = two_step_example(gate=True)
    arguments = {**dict(u=u, delta=delta, A=A, B=B, C=C, D=D, z=z), **change}
    with pytest.raises(ValueError, match=message):
        selective_scan(**arguments)


@pytest.mark.skipif(not triton_interpreter.TRITON_INSTALLED, reason="triton is not installed")
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="the interpreter accepts CPU tensors")
def test_forcing_triton_on_cpu_without_the_interpreter_raises() -> None:
    inputs, _ = two_step_example(gate=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        selective_scan(*inputs, implementation="triton")


@dataclasses.dataclass(frozen=True)
class ScanCase:
    """One comparison of the kernel against the reference. The default shape makes 3 channel
    blocks of 16 (the last partly masked), pads 5 states to 8 and loops over 6 steps."""

    dtype: torch.dtype = torch.float32
    batch: int = 2
    dim: int = 40
    d_state: int = 5
    length: int = 6
    block_dim: int | None = 16
    options: bool = True  # D, z, delta_bias and softplus
    delta_shift: float = 0.0  # 25 puts delta + bias above softplus' threshold
    layout: str = "contiguous"  # or "transposed": non-contiguous views of the same values
    through_dispatcher: bool = False


def make_inputs(case: ScanCase, device: str) -> dict:
    generator = torch.Generator().manual_seed(0)
    b, d, n, l = case.batch, case.dim, case.d_state, case.length
    values = dict(u=torch.randn(b, d, l, generator=generator), delta=torch.randn(b, d, l, generator=generator) + case.delta_shift,
                  A=-torch.rand(d, n, generator=generator) * 2, B=torch.randn(b, n, l, generator=generator),
                  C=torch.randn(b, n, l, generator=generator))
    if case.options:
        values.update(D=torch.randn(d, generator=generator), z=torch.randn(b, d, l, generator=generator),
                      delta_bias=torch.randn(d, generator=generator), delta_softplus=True)
    else:
        values["delta"] = values["delta"].abs()  # a step size without softplus must be >= 0
    for key, value in values.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device)
            # A, D and delta_bias stay fp32 as in Mamba (A_log, D are kept in fp32)
            if key in ("u", "delta", "B", "C", "z"):
                value = value.to(case.dtype)
                if case.layout == "transposed":
                    value = value.transpose(1, 2).contiguous().transpose(1, 2)
            values[key] = value
    return values


def check_kernel_against_reference(case: ScanCase, device: str) -> None:
    inputs = make_inputs(case, device)
    if case.layout == "transposed":
        assert not inputs["u"].is_contiguous()
    if case.through_dispatcher:
        out = selective_scan(**inputs, implementation="triton")
    else:
        out = selective_scan_triton(**inputs, block_dim=case.block_dim)
    expected = selective_scan_reference(**inputs)
    assert out.dtype == case.dtype and out.shape == expected.shape
    rtol = RTOL[case.dtype]
    torch.testing.assert_close(out.float(), expected.float(), rtol=rtol, atol=rtol * expected.float().abs().max().item())


def check_kernel_refuses_inputs_that_require_grad(device: str) -> None:
    inputs = make_inputs(ScanCase(), device)
    inputs["u"].requires_grad_()
    with pytest.raises(ValueError, match="forward-only"):
        selective_scan(**inputs, implementation="triton")
    with torch.no_grad():  # no gradient asked: the kernel serves
        selective_scan(**inputs, implementation="triton")


INTERPRETER_CHECKS: dict[str, Callable[[str], None]] = {
    name: functools.partial(check_kernel_against_reference, case)
    for name, case in {
        "fp32_three_channel_blocks_six_steps": ScanCase(),
        "fp32_without_D_z_bias_softplus": ScanCase(options=False),
        "fp32_softplus_above_threshold": ScanCase(delta_shift=25.0, length=3),
        "fp16_inputs_fp32_A": ScanCase(dtype=torch.float16),
        "fp32_non_contiguous_views": ScanCase(layout="transposed"),
        "fp32_one_state_block_wider_than_dim": ScanCase(dim=3, d_state=1, block_dim=8),
        "dispatcher_forced_triton_default_block": ScanCase(dim=70, block_dim=None, through_dispatcher=True),
    }.items()
}
INTERPRETER_CHECKS["kernel_refuses_inputs_that_require_grad"] = check_kernel_refuses_inputs_that_require_grad


@pytest.fixture(scope="module")
def interpreter_verdicts() -> dict[str, str | None]:
    return triton_interpreter.verdicts(__file__)


@pytest.mark.parametrize("check_name", list(INTERPRETER_CHECKS))
def test_triton_kernel_in_interpreter(check_name: str, interpreter_verdicts: dict[str, str | None]) -> None:
    failure = interpreter_verdicts[check_name]
    assert failure is None, failure


@pytest.mark.skipif(not (torch.cuda.is_available() and triton_interpreter.TRITON_INSTALLED), reason="needs a CUDA GPU and triton")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(("dim", "d_state", "length"), [(640, 256, 4), (1536, 16, 1024)], ids=["fscil", "lm"])
def test_triton_kernel_on_cuda_with_default_launch_config(dtype: torch.dtype, dim: int, d_state: int, length: int) -> None:
    check_kernel_against_reference(ScanCase(dtype=dtype, batch=8, dim=dim, d_state=d_state, length=length,
                                            block_dim=None, through_dispatcher=True), "cuda")


@pytest.mark.skipif(not (torch.cuda.is_available() and triton_interpreter.TRITON_INSTALLED), reason="needs a CUDA GPU and triton")
def test_auto_takes_the_kernel_on_cuda_without_grad_and_the_reference_with_grad() -> None:
    inputs = make_inputs(ScanCase(dim=64, d_state=16, length=8), "cuda")
    with torch.no_grad():
        torch.testing.assert_close(selective_scan(**inputs), selective_scan_triton(**inputs), rtol=0, atol=0)
    inputs["u"].requires_grad_()
    y = selective_scan(**inputs)
    y.sum().backward()
    assert inputs["u"].grad is not None


if __name__ == "__main__":
    triton_interpreter.main(INTERPRETER_CHECKS)
