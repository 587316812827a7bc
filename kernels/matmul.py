"""Batch-invariant ``x @ weight.T``: a row's result does not depend on how many rows share the call.

Self-speculation is lossless by construction only if a verify row rounds exactly like the AR step
it stands for, and a request computes the same alone as beside others only if no row's result
depends on its neighbours. Vendor GEMMs promise neither: cuBLAS and MKL choose kernels, tile
shapes and split-K by the problem's shape.

- Reference (CPU): ``F.linear`` on rows padded to a multiple that depends on the CPU. MKL takes
  other micro-kernels for small calls and, with two threads, splits row counts unevenly: on this
  project's AVX2 machines every multiple of 4 rounds a row alike, on an AVX-512/AMX Xeon fp32
  calls of fewer than 16 rows differ from larger ones, and with 768 or more inputs calls of more
  than 32 or 64 rows take yet other kernels. So inference calls are split into pieces of at most 64
  rows, and the multiple (4, 8, 16, 32 or 64) they are padded to is probed once per dtype, shape
  and thread count (``row_multiple``); ``tests/test_kernels_matmul.py`` checks the result.
- Triton (CUDA): one tiling per weight, whatever the row count (``tiling(N)``: output tiles of
  ``block_m`` x ``block_n``, the reduction in ``block_k`` steps from k = 0 upward, accumulated in fp32, no
  split-K), so each output element is the same sequence of operations whatever the row count or the
  row's place in a tile. Narrower column tiles for narrower weights keep a GPU's multiprocessors
  busy at decode row counts (an H200's 132 had 64 programs for a 4096-wide projection).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

ROW_MULTIPLE = 4
NARROW = 8192  # weights of at most this many output columns take 32-wide column tiles, wider ones 64


@dataclass(frozen=True)
class Tiling:
    """A launch of the Triton product: output tiles, reduction step, warps and pipeline stages."""

    block_m: int = 32
    block_n: int = 64
    block_k: int = 64
    num_warps: int = 4
    num_stages: int = 3


def tiling(n: int) -> Tiling:
    """The tiling of a weight of ``n`` output columns: a function of the weight alone, never of the
    row count, which is what keeps a row's result independent of its batch."""
    return Tiling(block_n=32 if n <= NARROW else 64)


_SUPPORTED = (torch.float32, torch.bfloat16, torch.float16)


PROBED_MULTIPLES = (4, 8, 16, 32, 64)
PIECE_ROWS = 64  # the most rows one product call takes (inference)


def pad_rows(x: torch.Tensor, multiple: int = ROW_MULTIPLE) -> torch.Tensor:
    """Pad the first dimension with zeros up to a multiple of ``multiple``."""
    extra = -x.shape[0] % multiple
    if not extra:
        return x
    return torch.cat([x, x.new_zeros((extra, *x.shape[1:]))], dim=0)


@functools.cache
def row_multiple(dtype: torch.dtype, k: int, n: int, threads: int) -> int:
    """The smallest of ``PROBED_MULTIPLES`` under which ``F.linear`` on padded rows gives every row of
    a [*, k] x [n, k] product the same bits in any call of up to ``PIECE_ROWS`` rows (alone, at any
    offset, beside others) on this CPU with this many threads: calls of 1 .. 2m+1 rows and a few
    larger ones against one of ``PIECE_ROWS``. At the largest multiple every call has the same shape."""
    gen = torch.Generator().manual_seed(0)
    w = (torch.randn((n, k), generator=gen) / k**0.5).to(dtype)
    # rounding differences between kernels are rare in bf16 outputs (about one in ten thousand on an AMX
    # Xeon), so the calls are compared on several batches
    batches = [torch.randn((PIECE_ROWS, k), generator=gen).to(dtype) for _ in range(4)]
    fulls = [F.linear(x, w) for x in batches]
    for m in PROBED_MULTIPLES:
        counts = [r for r in [*range(1, 2 * m + 2), 3 * m + 1, 5 * m - 1] if r < PIECE_ROWS]
        if all(
            torch.equal(F.linear(pad_rows(x[s : s + r], m), w)[:r], full[s : s + r])
            for x, full in zip(batches, fulls)
            for r in counts
            for s in (0, 1)
        ):
            return m
    return PROBED_MULTIPLES[-1]


def matmul_reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [M, K], weight [N, K] -> [M, N] in x's dtype; rows padded so MKL rounds every row alike, and,
    without gradients, calls of more than ``PIECE_ROWS`` rows split (kernels for large calls round
    otherwise). Training's large calls are not split: it needs no invariance."""
    n, k = x.shape
    multiple = row_multiple(x.dtype, k, weight.shape[0], torch.get_num_threads())
    if n <= PIECE_ROWS or torch.is_grad_enabled():
        return F.linear(pad_rows(x, multiple), weight)[:n]
    return torch.cat([F.linear(pad_rows(piece, multiple), weight)[: piece.shape[0]] for piece in x.split(PIECE_ROWS)])


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def matmul_kernel(
        x_ptr,
        w_ptr,
        out_ptr,
        m,
        n,
        k,
        stride_xm,
        stride_wn,
        stride_om,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        OUT_BF16: tl.constexpr,
        IEEE: tl.constexpr,
        UPCAST: tl.constexpr,
    ):
        pid_m = tl.program_id(0).to(tl.int64)
        pid_n = tl.program_id(1).to(tl.int64)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, k, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            a_mask = (rows[:, None] < m) & (ks[None, :] < k)
            b_mask = (cols[None, :] < n) & (ks[:, None] < k)
            a = tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :], mask=a_mask, other=0.0)
            b = tl.load(w_ptr + cols[None, :] * stride_wn + ks[:, None], mask=b_mask, other=0.0)
            if UPCAST:  # the interpreter's dot mistakes bf16 operands' bits
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            if IEEE:  # fp32 operands: full-precision products, not TF32
                acc += tl.dot(a, b, input_precision="ieee", out_dtype=tl.float32)
            else:
                acc += tl.dot(a, b, out_dtype=tl.float32)
        mask = (rows[:, None] < m) & (cols[None, :] < n)
        out = out_ptr + rows[:, None] * stride_om + cols[None, :]
        if OUT_BF16:  # out_ptr is the int16 view of a bf16 tensor: round to nearest even by hand
            bits = acc.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
            tl.store(out, bits.to(tl.uint16).to(tl.int16, bitcast=True), mask=mask)
        else:
            tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)

    return matmul_kernel


def matmul_triton(x: torch.Tensor, weight: torch.Tensor, launch: Tiling | None = None) -> torch.Tensor:
    """Same contract as :func:`matmul_reference`, with the weight's :func:`tiling`. ``launch`` replaces
    it (bench/kernels.py compares tilings); invariance holds only while every call with one weight
    uses one tiling."""
    if x.dtype not in _SUPPORTED or weight.dtype != x.dtype:
        raise TypeError(f"matmul_triton needs x and weight of one dtype in {_SUPPORTED}, got {x.dtype}, {weight.dtype}")
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"shapes {tuple(x.shape)} and {tuple(weight.shape)} do not multiply as x @ weight.T")
    x = x if x.stride(-1) == 1 else x.contiguous()
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    m, k = x.shape
    n = weight.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m and n:
        t = launch or tiling(n)
        bf16 = x.dtype == torch.bfloat16
        interpreted = os.environ.get("TRITON_INTERPRET") == "1"
        _kernel()[(-(-m // t.block_m), -(-n // t.block_n))](
            x,
            weight,
            out.view(torch.int16) if bf16 else out,
            m,
            n,
            k,
            x.stride(0),
            weight.stride(0),
            out.stride(0),
            t.block_m,
            t.block_n,
            t.block_k,
            bf16,
            x.dtype == torch.float32 or interpreted,
            interpreted,
            num_warps=t.num_warps,
            num_stages=t.num_stages,
        )
    return out
