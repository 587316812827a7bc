"""Writing committed keys/values into the paged cache: one launch for K and V of a whole step.

The rows of a packed step whose keys/values are committed (prefill, AR tokens, verify blocks, the
d_j of a quadratic cycle) go to their cache slots (``page * page_size + offset``, computed on the
host from the page tables). Commit and rollback never move data: they change a sequence's length
(``models.kv_cache``), so this copy is the only cache traffic a step makes.

RoPE is not fused in: every row's rotated key is needed by the step's own attention (a read-only
draft reads its keys from registers, never from the cache), so the rope kernel must rotate all
rows anyway and a fused write would only save re-reading the written subset of an already
L2-resident tensor. The copy moves raw bits (an integer view of the element type), so it is exact
for every dtype, and on the CPU interpreter it does not touch its broken bf16 arithmetic.
"""

from __future__ import annotations

import functools

import torch

_BITS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def kv_write_reference(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rows: torch.Tensor,
    slots: torch.Tensor,
) -> None:
    """k_cache/v_cache [S, Hkv, D] (one layer's slot arrays) receive k/v [T, Hkv, D] rows ``rows`` [W]
    at slots ``slots`` [W], in place. Rows are distinct and ascending (as a step packs them), slots
    distinct (a step writes a position once); when every row is written, none is gathered."""
    if rows.numel() == k.shape[0]:  # every row, in order (an AR step, a prefill chunk, a verify block)
        k_cache.index_copy_(0, slots, k)
        v_cache.index_copy_(0, slots, v)
        return
    k_cache.index_copy_(0, slots, k.index_select(0, rows))
    v_cache.index_copy_(0, slots, v.index_select(0, rows))


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def kv_write_kernel(
        k_ptr,
        v_ptr,
        k_cache_ptr,
        v_cache_ptr,
        rows_ptr,
        slots_ptr,
        stride_k,
        stride_v,
        stride_kc,
        stride_vc,
        width,
        BLOCK: tl.constexpr,
    ):
        w = tl.program_id(0)
        row = tl.load(rows_ptr + w).to(tl.int64)
        slot = tl.load(slots_ptr + w).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        inside = cols < width
        k = tl.load(k_ptr + row * stride_k + cols, mask=inside)
        v = tl.load(v_ptr + row * stride_v + cols, mask=inside)
        tl.store(k_cache_ptr + slot * stride_kc + cols, k, mask=inside)
        tl.store(v_cache_ptr + slot * stride_vc + cols, v, mask=inside)

    return kv_write_kernel


def _flat_rows(x: torch.Tensor) -> torch.Tensor:
    """[N, Hkv, D] -> the [N, Hkv*D] integer view the kernel copies (rows may be strided)."""
    rows = x.reshape(x.shape[0], -1)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    return rows.view(_BITS[x.element_size()])


def kv_write_triton(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rows: torch.Tensor,
    slots: torch.Tensor,
) -> None:
    """Same contract as :func:`kv_write_reference`: one launch, one program per written row."""
    import triton

    if k.dtype != k_cache.dtype or v.dtype != v_cache.dtype:
        raise TypeError(f"keys/values ({k.dtype}, {v.dtype}) must match the cache ({k_cache.dtype}, {v_cache.dtype})")
    if k.shape[1:] != k_cache.shape[1:] or v.shape[1:] != v_cache.shape[1:]:
        raise ValueError(f"rows of shape {tuple(k.shape[1:])} do not fit cache slots {tuple(k_cache.shape[1:])}")
    if rows.shape != slots.shape:
        raise ValueError(f"{rows.numel()} rows for {slots.numel()} slots")
    if not rows.numel():
        return
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("cache slot arrays must be contiguous (they are written in place)")
    k_rows, v_rows = _flat_rows(k), _flat_rows(v)
    k_slots, v_slots = _flat_rows(k_cache), _flat_rows(v_cache)
    width = k_rows.shape[1]
    _kernel()[(rows.numel(),)](
        k_rows,
        v_rows,
        k_slots,
        v_slots,
        rows.contiguous(),
        slots.contiguous(),
        k_rows.stride(0),
        v_rows.stride(0),
        k_slots.stride(0),
        v_slots.stride(0),
        width,
        BLOCK=triton.next_power_of_2(width),
    )
