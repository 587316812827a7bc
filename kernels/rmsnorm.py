"""RMSNorm: one row per program, so a row's result never depends on how many rows share the call.

Numerics follow ``models.layers.RMSNorm``: the row is normalised in fp32, rounded to the input
dtype, then scaled by the weight (the product rounded to the output dtype). The Triton kernel
rounds bf16 to nearest even itself: the interpreter truncates when it stores bf16.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from kernels import native

_SUPPORTED = (torch.float32, torch.bfloat16, torch.float16)


def rmsnorm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., H], weight [H] -> [..., H] in the promoted dtype of x and weight (as the model computes it)."""
    if torch.is_grad_enabled() and x.requires_grad:  # training: the spelled-out formula autograd knows
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    elif x.dtype == weight.dtype == torch.float32:
        # torch's fused op: one call instead of five, bit-identical (tests/test_kernels_rmsnorm.py)
        return F.rms_norm(x, weight.shape, weight, eps)
    else:  # the same fused op normalises in fp32, bit-identical to the formula above
        h = F.rms_norm(x.float(), weight.shape, None, eps)
    return weight * h.to(x.dtype)


def _native_rows(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    rows = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    out = torch.empty(x.shape, dtype=x.dtype)
    status = native.library().rms_norm(rows.data_ptr(), rows.stride(0), weight.data_ptr(), out.data_ptr(),
                                       rows.shape[0], rows.shape[1], eps, native.DTYPES[x.dtype])  # fmt: skip
    if status != 0:
        raise MemoryError("native RMSNorm: no memory for a row")
    return out


@functools.cache
def _same_bits(width: int, dtype: torch.dtype, eps: float) -> bool:
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(64, width, generator=gen) * torch.logspace(-3, 3, 64)[:, None]).to(dtype)
    weight = torch.randn(width, generator=gen).to(dtype)
    return torch.equal(_native_rows(x, weight, eps), rmsnorm_reference(x, weight, eps))


def native_is_reference(width: int, dtype: torch.dtype, eps: float) -> bool:
    """Whether the native kernel gives the reference's bits for rows this wide, probed once on random
    rows of several scales, in fp32 (where any other order of the sum of squares shows) and in
    ``dtype``. Its sum follows the order torch's CPU mean takes for rows of 256 on this build
    (measured); where torch sums otherwise (other widths, other CPU capabilities) the probe fails and
    the reference serves, so the fast path never changes a bit of an RMSNorm."""
    return _same_bits(width, torch.float32, eps) and _same_bits(width, dtype, eps)


def rmsnorm_native(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """The reference's result in one native call (``csrc/rmsnorm.c``), bit for bit: None (the caller then
    takes the reference) where the native kernels cannot take the call or the probe finds other bits."""
    if not native.serves(x, weight) or x.stride(-1) != 1 or not native_is_reference(x.shape[-1], x.dtype, eps):
        return None
    return _native_rows(x, weight, eps)


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def rmsnorm_kernel(
        x_ptr,
        w_ptr,
        out_ptr,
        stride_x,
        stride_out,
        hidden,
        eps,
        BLOCK: tl.constexpr,
        X_BF16: tl.constexpr,
        X_FP16: tl.constexpr,
        OUT_BF16: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < hidden
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        h = x * tl.rsqrt(tl.sum(x * x, axis=0) / hidden + eps)
        # h.to(x.dtype) of the reference, kept in fp32 registers
        if X_BF16:
            bits = h.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            h = bits.to(tl.float32, bitcast=True)
        elif X_FP16:
            h = h.to(tl.float16).to(tl.float32)
        y = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32) * h
        if OUT_BF16:  # out_ptr is the int16 view of a bf16 tensor
            bits = y.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
            tl.store(out_ptr + row * stride_out + cols, bits.to(tl.uint16).to(tl.int16, bitcast=True), mask=mask)
        else:
            tl.store(out_ptr + row * stride_out + cols, y.to(out_ptr.dtype.element_ty), mask=mask)

    return rmsnorm_kernel


def rmsnorm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Same contract as :func:`rmsnorm_reference`; x and weight in fp32, bf16 or fp16."""
    import triton

    if x.dtype not in _SUPPORTED or weight.dtype not in _SUPPORTED:
        raise TypeError(f"rmsnorm_triton supports {_SUPPORTED}, got {x.dtype} and {weight.dtype}")
    hidden = x.shape[-1]
    if weight.shape != (hidden,):
        raise ValueError(f"weight must have shape ({hidden},), got {tuple(weight.shape)}")
    rows = x.reshape(-1, hidden)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out_dtype = torch.promote_types(x.dtype, weight.dtype)
    out = torch.empty(rows.shape, dtype=out_dtype, device=x.device)
    if rows.shape[0]:
        _kernel()[(rows.shape[0],)](
            rows,
            weight.contiguous(),
            out.view(torch.int16) if out_dtype == torch.bfloat16 else out,
            rows.stride(0),
            out.stride(0),
            hidden,
            eps,
            BLOCK=triton.next_power_of_2(hidden),
            X_BF16=x.dtype == torch.bfloat16,
            X_FP16=x.dtype == torch.float16,
            OUT_BF16=out_dtype == torch.bfloat16,
        )
    return out.view(x.shape)
