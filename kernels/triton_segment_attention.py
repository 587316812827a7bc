"""Triton attention of packed segments over the paged KV cache (the reference is in kernels.segment_attention).

One program handles a tile of query rows of one segment for one KV head, with every query head
that shares the KV head packed in (row m of the tile is query token m // G, head m % G). For
every mask kind, what a query row sees is a *prefix* of the tile's virtual key list: the cached
prefix (read through the segment's row of ``AttentionMetadata.prefix_slots``), then segment
rows in order. So the mask is one number per row, the count of keys it sees. Keys are
visited in fixed blocks of ``KEY_BLOCK`` from key 0 and merged with a running log-sum-exp; a
block a row cannot see rescales by exactly 1 and adds exact zeros, so a row's result does not
depend on the tile, the segment length or the batch. The reference normalises by the row's
global maximum instead of a running one: the two agree to rounding (fp32 ~1e-6), not bitwise.

Arithmetic is fp32 (inputs upcast on load, ``tl.dot`` in IEEE fp32); bf16 outputs are rounded to
nearest even by hand, since the interpreter truncates. Not tuned for GPUs yet: bf16 operands could
go to the tensor cores for Q.K (exact products, fp32 sums), and BLOCK_M is fixed.
"""

from __future__ import annotations

import functools

import torch

from kernels.masks import MaskKind
from kernels.segment_attention import KEY_BLOCK, AttentionMetadata

BLOCK_M = 32  # (query token, head) rows per tile
_KIND_CODE = {MaskKind.CAUSAL: 0, MaskKind.BIDIRECTIONAL: 1}


def _tiles(meta: AttentionMetadata, group: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Per-tile metadata [tiles, META] and the flat prefix slots, built once per step (host work, one copy).

    A tile's row: segment's first packed row, tile's first segment row, rows, prefix length, offset of
    the segment's slots, mask kind, segment length, keys to visit.
    """
    per_tile = max(BLOCK_M // group, 1)
    width = meta.prefix_slots.shape[1]
    rows: list[list[int]] = []
    for s, seg in enumerate(meta.segments):
        prefix, kind = seg.prefix_len, _KIND_CODE[seg.kind]
        for row0 in range(0, seg.q_len, per_tile):
            n = min(per_tile, seg.q_len - row0)
            # causal: keys after the tile's last row are invisible to all of its rows
            tile_keys = prefix + row0 + n if seg.kind is MaskKind.CAUSAL else prefix + seg.q_len
            rows.append([seg.q_start, row0, n, prefix, s * width, kind, seg.q_len, tile_keys])
    if not rows:
        return None
    device = meta.prefix_slots.device
    return torch.tensor(rows, dtype=torch.int32, device=device), meta.prefix_slots.reshape(-1).contiguous()


def decode_metadata(positions: torch.Tensor, prefix_slots: torch.Tensor, group: int) -> AttentionMetadata:
    """The metadata of a step of one-row causal segments (AR decodes), built on the device from tensors
    alone, so that a CUDA graph can capture it: segment i is packed row i at ``positions[i]`` with that
    many cached keys, whose slots are ``prefix_slots[i]`` (entries past them are never read). Its tiles
    are what ``_tiles`` builds from the same segments; it has no host-side segments, so only this
    backend can run it."""
    count, width = prefix_slots.shape
    index = torch.arange(count, device=positions.device)
    zero, one = torch.zeros_like(index), torch.ones_like(index)
    # the columns of _tiles' rows: q_start, row0, rows, prefix, slot offset, kind (causal), q_len, keys
    tiles = torch.stack([index, zero, one, positions, index * width, zero, one, positions + 1], dim=1)
    meta = AttentionMetadata([], prefix_slots)
    meta.derived(("triton", group), lambda: (tiles.to(torch.int32), prefix_slots.reshape(-1)))
    return meta


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def attention_kernel(
        q_ptr,
        k_ptr,
        v_ptr,
        k_cache_ptr,
        v_cache_ptr,
        out_ptr,
        meta_ptr,
        slots_ptr,
        stride_qt,
        stride_qh,
        stride_kt,
        stride_kh,
        stride_vt,
        stride_vh,
        stride_kcs,
        stride_kch,
        stride_vcs,
        stride_vch,
        stride_ot,
        stride_oh,
        head_dim,
        scale,
        GROUP: tl.constexpr,
        META: tl.constexpr,
        BLOCK_M: tl.constexpr,
        KEY_BLOCK: tl.constexpr,
        BLOCK_D: tl.constexpr,
        OUT_BF16: tl.constexpr,
        USE_DOT: tl.constexpr,
    ):
        tile = tl.program_id(0).to(tl.int64)
        kv_head = tl.program_id(1)
        meta = meta_ptr + tile * META
        seg_start = tl.load(meta + 0)
        row0 = tl.load(meta + 1)
        n_rows = tl.load(meta + 2)
        prefix = tl.load(meta + 3)
        slot0 = tl.load(meta + 4)
        kind = tl.load(meta + 5)
        q_len = tl.load(meta + 6)
        n_keys = tl.load(meta + 7)

        m = tl.arange(0, BLOCK_M)
        dims = tl.arange(0, BLOCK_D)
        dim_ok = dims < head_dim
        t = row0 + m // GROUP  # query row within the segment
        head = kv_head * GROUP + m % GROUP
        row_ok = m < n_rows * GROUP
        # visible keys per row, a prefix of the virtual key list (kind codes: see _KIND_CODE)
        limit = tl.where(kind == 0, prefix + t + 1, prefix + q_len)
        limit = tl.where(row_ok, limit, n_keys)  # padding rows see every key (finite sums); never stored

        q_rows = (seg_start + t).to(tl.int64)
        q = tl.load(
            q_ptr + q_rows[:, None] * stride_qt + head[:, None] * stride_qh + dims[None, :],
            mask=row_ok[:, None] & dim_ok[None, :],
            other=0.0,
        ).to(tl.float32)

        m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
        keys = tl.arange(0, KEY_BLOCK)
        for start in range(0, n_keys, KEY_BLOCK):
            kk = start + keys
            in_prefix = kk < prefix
            in_seg = (kk >= prefix) & (kk < n_keys)
            slot = tl.load(slots_ptr + slot0 + kk, mask=in_prefix, other=0).to(tl.int64)
            seg_row = (seg_start + kk - prefix).to(tl.int64)
            cache_mask = in_prefix[:, None] & dim_ok[None, :]
            seg_mask = in_seg[:, None] & dim_ok[None, :]
            k_blk = tl.load(
                k_cache_ptr + slot[:, None] * stride_kcs + kv_head * stride_kch + dims[None, :],
                mask=cache_mask,
                other=0.0,
            ).to(tl.float32) + tl.load(
                k_ptr + seg_row[:, None] * stride_kt + kv_head * stride_kh + dims[None, :], mask=seg_mask, other=0.0
            ).to(tl.float32)
            v_blk = tl.load(
                v_cache_ptr + slot[:, None] * stride_vcs + kv_head * stride_vch + dims[None, :],
                mask=cache_mask,
                other=0.0,
            ).to(tl.float32) + tl.load(
                v_ptr + seg_row[:, None] * stride_vt + kv_head * stride_vh + dims[None, :], mask=seg_mask, other=0.0
            ).to(tl.float32)
            if USE_DOT:
                s = tl.dot(q, tl.trans(k_blk), input_precision="ieee") * scale
            else:
                s = tl.sum(q[:, None, :] * k_blk[None, :, :], axis=2) * scale
            s = tl.where(kk[None, :] < limit[:, None], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            if USE_DOT:
                acc = acc * alpha[:, None] + tl.dot(p, v_blk, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v_blk[None, :, :], axis=1)
            m_i = m_new
        out = acc / l_i[:, None]

        dst = out_ptr + q_rows[:, None] * stride_ot + head[:, None] * stride_oh + dims[None, :]
        store_mask = row_ok[:, None] & dim_ok[None, :]
        if OUT_BF16:  # out_ptr is the int16 view of a bf16 tensor
            bits = out.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
            tl.store(dst, bits.to(tl.uint16).to(tl.int16, bitcast=True), mask=store_mask)
        else:
            tl.store(dst, out.to(dst.dtype.element_ty), mask=store_mask)

    return attention_kernel


def segment_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    *,
    use_dot: bool = True,
) -> torch.Tensor:
    """Same contract as ``segment_attention_reference``: q [T, Hq, D]; k, v [T, Hkv, D]; caches
    [slots, Hkv, D] -> [T, Hq, D] in q's dtype. One launch; rows no segment covers are left unset.

    ``use_dot=False`` forms the products by broadcast and sum instead of ``tl.dot``: much slower, but
    under the interpreter, where ``tl.dot`` goes to BLAS and a row's rounding depends on its place in
    the tile, it makes a row's result bitwise independent of the tile (the lossless property).
    """
    import triton

    t_total, hq, d = q.shape
    hkv = k.shape[1]
    if hq % hkv:
        raise ValueError(f"{hq} query heads do not share {hkv} KV heads evenly")
    for name, x in (("q", q), ("k", k), ("v", v), ("k_cache", k_cache), ("v_cache", v_cache)):
        if x.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous last dimension")
    out = torch.empty((t_total, hq, d), dtype=q.dtype, device=q.device)
    tiles = meta.derived(("triton", hq // hkv), lambda: _tiles(meta, hq // hkv))
    if tiles is None:
        return out
    tile_meta, flat_slots = tiles
    bf16 = q.dtype == torch.bfloat16
    _kernel()[(tile_meta.shape[0], hkv)](
        q,
        k,
        v,
        k_cache,
        v_cache,
        out.view(torch.int16) if bf16 else out,
        tile_meta,
        flat_slots if flat_slots.numel() else tile_meta,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        v_cache.stride(0),
        v_cache.stride(1),
        out.stride(0),
        out.stride(1),
        d,
        scale,
        GROUP=hq // hkv,
        META=tile_meta.shape[1],
        BLOCK_M=max(BLOCK_M, triton.next_power_of_2(hq // hkv)),
        KEY_BLOCK=KEY_BLOCK,
        BLOCK_D=max(triton.next_power_of_2(d), 16),
        OUT_BF16=bf16,
        USE_DOT=use_dot,
    )
    return out
