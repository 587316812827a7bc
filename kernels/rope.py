"""Rotary embedding of queries and keys in one launch, with the Llama-4 query scale folded in.

The reference is ``models.layers``' ``apply_rotary(q, cos, sin) * qscale, apply_rotary(k, cos, sin)``.
The kernel computes each element in fp32 and rounds once to the output dtype (round to nearest
even, done by hand for bf16 because the interpreter truncates), whereas torch on bf16 tensors
rounds after every product and sum: in bf16 the two agree to about one ulp, in fp32 to rounding.
"""

from __future__ import annotations

import functools

import torch

from kernels import native

_SUPPORTED = (torch.float32, torch.bfloat16, torch.float16)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


def rope_reference(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, q_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [T, Hq, D], k [T, Hkv, D]; cos, sin [T, D] or [T, 1, D]; q_scale [T] or [T, 1, 1] (None: 1).

    Returns roped q (times q_scale) and roped k, in the dtype q and k share.
    """
    t, hq, d = q.shape
    cos, sin = cos.reshape(t, 1, d), sin.reshape(t, 1, d)
    # queries and keys rotated side by side: the same operations on every element as rotating them
    # apart, in half the calls (one row of the bundled model: 15 us against 22)
    q_out, k_out = _rotate(torch.cat([q, k], dim=1), cos, sin).split_with_sizes([hq, k.shape[1]], 1)
    if q_scale is not None:
        q_out = q_out * q_scale.reshape(t, 1, 1)
    return q_out, k_out


def rope_native(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, q_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The reference's contract in one native call (``csrc/rope.c``), bit for bit: the same operations,
    each rounded alike. None where the native kernels cannot take the call."""
    t, hq, d = q.shape
    extra = () if q_scale is None else (q_scale,)
    if not native.serves(q, k, cos, sin, *extra) or d % 2 or d > native.MAX_HEAD:
        return None
    cos, sin = cos.reshape(t, d).contiguous(), sin.reshape(t, d).contiguous()
    scale = None if q_scale is None else q_scale.reshape(t).contiguous()
    out = torch.empty((t, hq + k.shape[1], d), dtype=q.dtype)
    native.library().rope(
        q.data_ptr(), native.row_stride(q), k.data_ptr(), native.row_stride(k), cos.data_ptr(), sin.data_ptr(),
        None if scale is None else scale.data_ptr(), out.data_ptr(), t, hq, k.shape[1], d, native.DTYPES[q.dtype],
    )  # fmt: skip
    q_out, k_out = out.split_with_sizes([hq, k.shape[1]], 1)
    return q_out, k_out


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def rope_kernel(
        q_ptr,
        k_ptr,
        cos_ptr,
        sin_ptr,
        scale_ptr,
        q_out_ptr,
        k_out_ptr,
        stride_qt,
        stride_qh,
        stride_kt,
        stride_kh,
        stride_cos,
        stride_sin,
        stride_qot,
        stride_kot,
        q_heads,
        half,
        BLOCK: tl.constexpr,
        HAS_SCALE: tl.constexpr,
        OUT_BF16: tl.constexpr,
    ):
        t = tl.program_id(0).to(tl.int64)
        head = tl.program_id(1)
        cols = tl.arange(0, BLOCK)
        mask = cols < half
        if head < q_heads:
            src = q_ptr + t * stride_qt + head * stride_qh
            dst = q_out_ptr + t * stride_qot + head * 2 * half
        else:
            src = k_ptr + t * stride_kt + (head - q_heads) * stride_kh
            dst = k_out_ptr + t * stride_kot + (head - q_heads) * 2 * half
        x1 = tl.load(src + cols, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(src + half + cols, mask=mask, other=0.0).to(tl.float32)
        c1 = tl.load(cos_ptr + t * stride_cos + cols, mask=mask, other=0.0).to(tl.float32)
        c2 = tl.load(cos_ptr + t * stride_cos + half + cols, mask=mask, other=0.0).to(tl.float32)
        s1 = tl.load(sin_ptr + t * stride_sin + cols, mask=mask, other=0.0).to(tl.float32)
        s2 = tl.load(sin_ptr + t * stride_sin + half + cols, mask=mask, other=0.0).to(tl.float32)
        y1 = x1 * c1 - x2 * s1
        y2 = x2 * c2 + x1 * s2
        if HAS_SCALE:
            if head < q_heads:
                scale = tl.load(scale_ptr + t).to(tl.float32)
                y1 = y1 * scale
                y2 = y2 * scale
        if OUT_BF16:  # the outputs are int16 views of bf16 tensors
            b1 = y1.to(tl.uint32, bitcast=True)
            b1 = b1 + 0x7FFF + ((b1 >> 16) & 1)
            b2 = y2.to(tl.uint32, bitcast=True)
            b2 = b2 + 0x7FFF + ((b2 >> 16) & 1)
            tl.store(dst + cols, (b1 >> 16).to(tl.uint16).to(tl.int16, bitcast=True), mask=mask)
            tl.store(dst + half + cols, (b2 >> 16).to(tl.uint16).to(tl.int16, bitcast=True), mask=mask)
        else:
            tl.store(dst + cols, y1.to(dst.dtype.element_ty), mask=mask)
            tl.store(dst + half + cols, y2.to(dst.dtype.element_ty), mask=mask)

    return rope_kernel


def rope_triton(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, q_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as :func:`rope_reference`; q and k share one dtype (fp32, bf16 or fp16)."""
    import triton

    t, q_heads, d = q.shape
    if q.dtype not in _SUPPORTED or k.dtype != q.dtype:
        raise TypeError(f"rope_triton needs q and k of one dtype in {_SUPPORTED}, got {q.dtype} and {k.dtype}")
    if d % 2 or k.shape[0] != t or k.shape[2] != d:
        raise ValueError(f"incompatible q {tuple(q.shape)} and k {tuple(k.shape)} (head dim must be even)")
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    cos = cos.reshape(t, d).contiguous()
    sin = sin.reshape(t, d).contiguous()
    q_out = torch.empty((t, q_heads, d), dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if t:
        bf16 = q.dtype == torch.bfloat16
        _kernel()[(t, q_heads + k.shape[1])](
            q,
            k,
            cos,
            sin,
            q_scale.reshape(t).contiguous() if q_scale is not None else cos,
            q_out.view(torch.int16) if bf16 else q_out,
            k_out.view(torch.int16) if bf16 else k_out,
            q.stride(0),
            q.stride(1),
            k.stride(0),
            k.stride(1),
            cos.stride(0),
            sin.stride(0),
            q_out.stride(0),
            k_out.stride(0),
            q_heads,
            d // 2,
            BLOCK=triton.next_power_of_2(d // 2),
            HAS_SCALE=q_scale is not None,
            OUT_BF16=bf16,
        )
    return q_out, k_out
