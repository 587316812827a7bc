"""Batch-invariant matmul: the Triton kernel against its reference (on CPU through the Triton
interpreter), and the property both exist for: a row's result does not depend on the batch."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from kernels.matmul import matmul_reference, matmul_triton  # noqa: E402

TOLERANCE = {
    torch.float32: {"rtol": 1e-4, "atol": 1e-4},
    torch.float16: {"rtol": 2e-3, "atol": 2e-3},
    # the interpreter truncates when it stores bf16, the reference rounds to nearest: one ulp apart
    torch.bfloat16: {"rtol": 2e-2, "atol": 2e-2},
}


def _inputs(m: int, n: int, k: int, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen).to(dtype)
    w = (torch.randn(n, k, generator=gen) / k**0.5).to(dtype)
    return x, w


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
# the last shape is wider than kernels.matmul.NARROW: 64-wide column tiles
@pytest.mark.parametrize(("m", "n", "k"), [(1, 64, 64), (5, 96, 40), (33, 70, 130), (64, 128, 64), (3, 8200, 40)])
def test_triton_matches_reference(m, n, k, dtype):
    x, w = _inputs(m, n, k, dtype)
    expected = x.float() @ w.float().T
    got = matmul_triton(x, w)
    assert got.dtype == dtype and got.shape == (m, n)
    torch.testing.assert_close(got.float(), expected, **TOLERANCE[dtype])
    torch.testing.assert_close(matmul_reference(x.float(), w.float()), expected, rtol=1e-5, atol=1e-5)


def test_triton_handles_strided_and_empty_inputs():
    x, w = _inputs(6, 32, 48, torch.float32)
    wide = torch.cat([x, x], dim=1)[:, :48]  # row stride 96
    torch.testing.assert_close(matmul_triton(wide, w), x @ w.T, rtol=1e-4, atol=1e-4)
    assert matmul_triton(x[:0], w).shape == (0, 32)
    with pytest.raises(ValueError, match="do not multiply"):
        matmul_triton(x, w[:, :10])
    with pytest.raises(TypeError):
        matmul_triton(x, w.double())


@pytest.mark.parametrize("threads", [1, 2])
def test_reference_rows_do_not_depend_on_the_row_count(threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x, w = _inputs(120, 384, 256, torch.float32, seed=threads)
        full = matmul_reference(x, w)
        for rows in list(range(1, 18)) + [31, 64, 119]:
            for start in (0, 1):
                assert torch.equal(matmul_reference(x[start : start + rows], w), full[start : start + rows])
    finally:
        torch.set_num_threads(before)
