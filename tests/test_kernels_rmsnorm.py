"""RMSNorm Triton kernel vs its PyTorch reference, on CPU through the Triton interpreter."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from kernels.rmsnorm import rmsnorm_reference, rmsnorm_triton  # noqa: E402
from models import matmul  # noqa: E402
from models.layers import RMSNorm  # noqa: E402

EPS = 1e-5
# fp32: both compute the same fp32 ops, summation order aside. bf16/fp16: the normalised row is
# rounded to the input dtype before the weight product, so a last-bit difference in fp32 can move
# an element by one ulp of the narrow dtype.
TOLERANCE = {
    torch.float32: {"rtol": 1e-5, "atol": 1e-5},
    torch.bfloat16: {"rtol": 8e-3, "atol": 1e-3},
    torch.float16: {"rtol": 1e-3, "atol": 1e-4},
}


def _inputs(shape: tuple[int, ...], dtype: torch.dtype, weight_dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=gen) * 3).to(dtype)
    weight = (1 + 0.5 * torch.randn(shape[-1], generator=gen)).to(weight_dtype)
    return x, weight


def test_reference_is_the_model_layer_with_the_fast_path_off(monkeypatch) -> None:
    """(On, a CPU takes the native kernel: tests/test_kernels_native.py.)"""
    monkeypatch.setattr(matmul, "FAST_PATH", False)
    x, weight = _inputs((4, 24), torch.bfloat16, torch.bfloat16)
    layer = RMSNorm(24, EPS).to(torch.bfloat16)
    layer.weight.data.copy_(weight)
    with torch.no_grad():
        assert torch.equal(rmsnorm_reference(x, weight, EPS), layer(x))


@pytest.mark.parametrize(
    ("dtype", "weight_dtype"),
    [
        (torch.float32, torch.float32),
        (torch.bfloat16, torch.bfloat16),
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.float16),
    ],
)
@pytest.mark.parametrize("shape", [(1, 8), (7, 40), (2, 3, 96), (5, 130)])
def test_matches_reference(shape: tuple[int, ...], dtype: torch.dtype, weight_dtype: torch.dtype) -> None:
    x, weight = _inputs(shape, dtype, weight_dtype)
    expected = rmsnorm_reference(x, weight, EPS)
    got = rmsnorm_triton(x, weight, EPS)
    assert got.dtype == expected.dtype and got.shape == expected.shape
    torch.testing.assert_close(got, expected, **TOLERANCE[expected.dtype])


def test_bf16_store_rounds_to_nearest_even() -> None:
    """With a bf16 input and an fp32 weight the output is fp32; with both bf16, the kernel's bf16 output is
    its own fp32 result rounded to nearest even (torch's rounding), not truncated as the interpreter would."""
    x, weight = _inputs((6, 72), torch.bfloat16, torch.bfloat16, seed=1)
    wide = rmsnorm_triton(x, weight.float(), EPS)
    assert wide.dtype == torch.float32
    assert torch.equal(rmsnorm_triton(x, weight, EPS), wide.to(torch.bfloat16))


def test_strided_rows_and_empty_input() -> None:
    x, weight = _inputs((6, 80), torch.float32, torch.float32, seed=2)
    view = x[:, :40]  # row stride 80, last dim contiguous
    torch.testing.assert_close(rmsnorm_triton(view, weight[:40], EPS), rmsnorm_reference(view, weight[:40], EPS))
    assert rmsnorm_triton(x[:0], weight, EPS).shape == (0, 80)


def test_row_result_does_not_depend_on_batch() -> None:
    """One row per program: a row normalised alone is bitwise the same row inside a batch."""
    x, weight = _inputs((9, 56), torch.float32, torch.float32, seed=3)
    full = rmsnorm_triton(x, weight, EPS)
    for i in (0, 4, 8):
        assert torch.equal(rmsnorm_triton(x[i : i + 1], weight, EPS), full[i : i + 1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 8), (7, 40), (4, 256), (300, 256), (5, 130), (3, 4096)])
def test_reference_uses_the_fused_op_bit_identically(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    """At inference the reference calls torch's fused rms_norm; it must equal the spelled-out formula."""
    x, weight = _inputs(shape, dtype, dtype)
    h = x.float()
    spelled = weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS)).to(dtype)
    with torch.inference_mode():
        assert torch.equal(rmsnorm_reference(x, weight, EPS), spelled)
