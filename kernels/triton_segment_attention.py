"""Triton attention of packed segments over the paged KV cache (the reference is in kernels.segment_attention).

One program handles a tile of query rows of one segment for one KV head, with every query head
that shares the KV head packed in (row m of the tile is query token m // G, head m % G), over one
slice of ``SPLIT_KEYS`` keys. For every mask kind, what a query row sees is a *prefix* of the
tile's virtual key list: the cached prefix (read through the segment's row of
``AttentionMetadata.prefix_slots``), then segment rows in order. So the mask is one number per row,
the count of keys it sees. Within its slice a program visits keys in fixed blocks of ``KEY_BLOCK``
with a running log-sum-exp; a second kernel merges each row's slices in order, slice 0 first. The
slices and blocks start at fixed key indices, and a block or slice a row cannot see rescales by
exactly 1 and adds exact zeros, so a row's result does not depend on the tile, the segment length,
the number of slices or the batch. Slices are what make a decode step parallel: one row over 4096
keys is 8 slices per KV head rather than one program walking all of them. The reference normalises
by the row's global maximum instead of a running one: the two agree to rounding (fp32 ~1e-6), not
bitwise.

Arithmetic is fp32 (inputs upcast on load); on a GPU the products go to the tensor cores as
``tf32x3`` (three TF32 products: about fp32's precision, and exact for bf16 inputs' Q.K, which a
full-precision fp32 ``tl.dot`` would instead form on the FMA units, spilling its operands). bf16
outputs are rounded to nearest even by hand, since the interpreter truncates.
"""

from __future__ import annotations

import functools

import torch

from kernels.masks import MaskKind
from kernels.segment_attention import KEY_BLOCK, AttentionMetadata

BLOCK_M = 32  # (query token, head) rows per tile
SPLIT_KEYS = 8 * KEY_BLOCK  # keys per slice; fixed, since a row's rounding follows the slices
_KIND_CODE = {MaskKind.CAUSAL: 0, MaskKind.BIDIRECTIONAL: 1}


def _tile_rows(segments: list[tuple[int, int, MaskKind]], group: int) -> list[tuple[int, ...]]:
    """The tiles of packed segments ((first packed row, rows, mask kind) each, in order): per tile, the
    segment's index, its first packed row, the tile's first segment row, the tile's rows, the kind's code,
    the segment's rows and the keys past the segment's prefix that the tile visits."""
    per_tile = max(BLOCK_M // group, 1)
    tiles = []
    for s, (q_start, q_len, kind) in enumerate(segments):
        for row0 in range(0, q_len, per_tile):
            n = min(per_tile, q_len - row0)
            # causal: keys after the tile's last row are invisible to all of its rows
            beyond = row0 + n if kind is MaskKind.CAUSAL else q_len
            tiles.append((s, q_start, row0, n, _KIND_CODE[kind], q_len, beyond))
    return tiles


def _tiles(meta: AttentionMetadata, group: int) -> tuple[torch.Tensor, torch.Tensor, int] | None:
    """Per-tile metadata [tiles, META], the flat prefix slots and the most keys a tile visits, built
    once per step (host work, one copy).

    A tile's row: segment's first packed row, tile's first segment row, rows, prefix length, offset of
    the segment's slots, mask kind, segment length, keys to visit.
    """
    width = meta.prefix_slots.shape[1]
    prefix = [seg.prefix_len for seg in meta.segments]
    tiles = _tile_rows([(seg.q_start, seg.q_len, seg.kind) for seg in meta.segments], group)
    rows = [
        [q_start, row0, n, prefix[s], s * width, kind, q_len, prefix[s] + beyond]
        for s, q_start, row0, n, kind, q_len, beyond in tiles
    ]
    if not rows:
        return None
    device = meta.prefix_slots.device
    tile_meta = torch.tensor(rows, dtype=torch.int32, device=device)
    return tile_meta, meta.prefix_slots.reshape(-1).contiguous(), max(r[-1] for r in rows)


def tile_layout(
    segments: list[tuple[int, MaskKind]], count: int, width: int, group: int, device: torch.device
) -> tuple[torch.Tensor, int]:
    """What ``_tiles`` builds for a step of ``count`` requests that each pack ``segments`` ((rows, mask
    kind), in order) and whose prefix slots are ``width`` columns a segment, less what depends on where
    the segments start: [tiles, 8] on ``device``: the segment's index among all (request-major), then
    _tiles' columns with the prefix length 0 and, in the last, the keys a tile visits past its prefix;
    and the most keys past a prefix that any tile visits. Made once per step shape (``graph_metadata``)."""
    packed, q_start = [], 0
    for _ in range(count):
        for rows, kind in segments:
            packed.append((q_start, rows, kind))
            q_start += rows
    layout = [
        [s, q, row0, n, s * width, kind, q_len, beyond]
        for s, q, row0, n, kind, q_len, beyond in _tile_rows(packed, group)
    ]
    return torch.tensor(layout, dtype=torch.long, device=device), max(row[-1] for row in layout)


def graph_metadata(
    layout: tuple[torch.Tensor, int], starts: torch.Tensor, prefix_slots: torch.Tensor, group: int
) -> AttentionMetadata:
    """The metadata of a step laid out by ``tile_layout``, completed on the device from tensors alone so
    that a CUDA graph can capture it: segment i (request-major) starts at position ``starts[i]`` right
    after that many cached keys, whose slots are ``prefix_slots[i]`` (entries past them are never read).
    Its tiles are what ``_tiles`` builds from the same segments, and every step launches the slices of
    the longest prefix the table holds (a row's unused slices are empty); it has no host-side segments,
    so only this backend can run it."""
    table, most_beyond = layout
    prefix = starts.index_select(0, table[:, 0])
    columns = [
        table[:, 1],
        table[:, 2],
        table[:, 3],
        prefix,
        table[:, 4],
        table[:, 5],
        table[:, 6],
        prefix + table[:, 7],
    ]
    tiles = torch.stack(columns, dim=1).to(torch.int32)
    meta = AttentionMetadata([], prefix_slots)
    most_keys = prefix_slots.shape[1] + most_beyond
    meta.derived(("triton", group), lambda: (tiles, prefix_slots.reshape(-1), most_keys))
    return meta


@functools.cache
def _kernels():
    """(slice kernel, merge kernel), built on first use (after a test may have set TRITON_INTERPRET)."""
    import triton
    import triton.language as tl

    @triton.jit
    def slice_kernel(
        q_ptr,
        k_ptr,
        v_ptr,
        k_cache_ptr,
        v_cache_ptr,
        part_ptr,
        stats_ptr,
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
        num_heads,
        num_slices,
        head_dim,
        scale,
        GROUP: tl.constexpr,
        META: tl.constexpr,
        BLOCK_M: tl.constexpr,
        KEY_BLOCK: tl.constexpr,
        SPLIT_KEYS: tl.constexpr,
        BLOCK_D: tl.constexpr,
        USE_DOT: tl.constexpr,
    ):
        """One tile's rows over one slice of keys: unnormalised sums and (max, sum of exps) per row."""
        tile = tl.program_id(0).to(tl.int64)
        kv_head = tl.program_id(1)
        piece = tl.program_id(2)
        meta = meta_ptr + tile * META
        n_keys = tl.load(meta + 7)
        first = piece * SPLIT_KEYS
        if first < n_keys:
            seg_start = tl.load(meta + 0)
            row0 = tl.load(meta + 1)
            n_rows = tl.load(meta + 2)
            prefix = tl.load(meta + 3)
            slot0 = tl.load(meta + 4)
            kind = tl.load(meta + 5)
            q_len = tl.load(meta + 6)

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
            for start in range(first, tl.minimum(first + SPLIT_KEYS, n_keys), KEY_BLOCK):
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
                    k_ptr + seg_row[:, None] * stride_kt + kv_head * stride_kh + dims[None, :],
                    mask=seg_mask,
                    other=0.0,
                ).to(tl.float32)
                v_blk = tl.load(
                    v_cache_ptr + slot[:, None] * stride_vcs + kv_head * stride_vch + dims[None, :],
                    mask=cache_mask,
                    other=0.0,
                ).to(tl.float32) + tl.load(
                    v_ptr + seg_row[:, None] * stride_vt + kv_head * stride_vh + dims[None, :],
                    mask=seg_mask,
                    other=0.0,
                ).to(tl.float32)
                if USE_DOT:
                    s = tl.dot(q, tl.trans(k_blk), input_precision="tf32x3") * scale
                else:
                    s = tl.sum(q[:, None, :] * k_blk[None, :, :], axis=2) * scale
                s = tl.where(kk[None, :] < limit[:, None], s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, axis=1))
                # a row that has seen no key yet keeps -inf: exponents taken from 0 give exact zeros
                m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
                alpha = tl.exp(m_i - m_ref)
                p = tl.exp(s - m_ref[:, None])
                l_i = l_i * alpha + tl.sum(p, axis=1)
                if USE_DOT:
                    acc = acc * alpha[:, None] + tl.dot(p, v_blk, input_precision="tf32x3")
                else:
                    acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v_blk[None, :, :], axis=1)
                m_i = m_new

            # part [T, H, slices, D] and stats [T, H, slices, 2] (max, sum of exps) of real rows
            entry = (q_rows * num_heads + head) * num_slices + piece
            tl.store(part_ptr + entry[:, None] * head_dim + dims[None, :], acc, mask=row_ok[:, None] & dim_ok[None, :])
            tl.store(stats_ptr + entry * 2, m_i, mask=row_ok)
            tl.store(stats_ptr + entry * 2 + 1, l_i, mask=row_ok)

    @triton.jit
    def merge_kernel(
        part_ptr,
        stats_ptr,
        out_ptr,
        meta_ptr,
        stride_ot,
        stride_oh,
        num_heads,
        num_slices,
        head_dim,
        GROUP: tl.constexpr,
        META: tl.constexpr,
        BLOCK_M: tl.constexpr,
        SPLIT_KEYS: tl.constexpr,
        BLOCK_D: tl.constexpr,
        OUT_BF16: tl.constexpr,
    ):
        """One tile's rows: their slices merged in order, normalised, stored in the output's dtype."""
        tile = tl.program_id(0).to(tl.int64)
        kv_head = tl.program_id(1)
        meta = meta_ptr + tile * META
        seg_start = tl.load(meta + 0)
        row0 = tl.load(meta + 1)
        n_rows = tl.load(meta + 2)
        n_keys = tl.load(meta + 7)
        m = tl.arange(0, BLOCK_M)
        dims = tl.arange(0, BLOCK_D)
        dim_ok = dims < head_dim
        head = kv_head * GROUP + m % GROUP
        row_ok = m < n_rows * GROUP
        q_rows = (seg_start + row0 + m // GROUP).to(tl.int64)
        mask = row_ok[:, None] & dim_ok[None, :]
        entry0 = (q_rows * num_heads + head) * num_slices

        m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
        for piece in range(0, tl.cdiv(n_keys, SPLIT_KEYS)):
            entry = entry0 + piece
            m_j = tl.load(stats_ptr + entry * 2, mask=row_ok, other=float("-inf"))
            l_j = tl.load(stats_ptr + entry * 2 + 1, mask=row_ok, other=0.0)
            acc_j = tl.load(part_ptr + entry[:, None] * head_dim + dims[None, :], mask=mask, other=0.0)
            m_new = tl.maximum(m_i, m_j)
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m_i - m_ref)
            beta = tl.exp(m_j - m_ref)
            l_i = l_i * alpha + l_j * beta
            acc = acc * alpha[:, None] + acc_j * beta[:, None]
            m_i = m_new
        out = acc / l_i[:, None]

        dst = out_ptr + q_rows[:, None] * stride_ot + head[:, None] * stride_oh + dims[None, :]
        if OUT_BF16:  # out_ptr is the int16 view of a bf16 tensor
            bits = out.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
            tl.store(dst, bits.to(tl.uint16).to(tl.int16, bitcast=True), mask=mask)
        else:
            tl.store(dst, out.to(dst.dtype.element_ty), mask=mask)

    return slice_kernel, merge_kernel


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
    [slots, Hkv, D] -> [T, Hq, D] in q's dtype. Two launches (slices, merge); rows no segment covers
    are left unset.

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
    tile_meta, flat_slots, most_keys = tiles
    group, num_slices = hq // hkv, -(-most_keys // SPLIT_KEYS)
    block_m, block_d = max(BLOCK_M, triton.next_power_of_2(group)), max(triton.next_power_of_2(d), 16)
    part = torch.empty((t_total, hq, num_slices, d), dtype=torch.float32, device=q.device)
    stats = torch.empty((t_total, hq, num_slices, 2), dtype=torch.float32, device=q.device)
    slice_kernel, merge_kernel = _kernels()
    slice_kernel[(tile_meta.shape[0], hkv, num_slices)](
        q,
        k,
        v,
        k_cache,
        v_cache,
        part,
        stats,
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
        hq,
        num_slices,
        d,
        scale,
        GROUP=group,
        META=tile_meta.shape[1],
        BLOCK_M=block_m,
        KEY_BLOCK=KEY_BLOCK,
        SPLIT_KEYS=SPLIT_KEYS,
        BLOCK_D=block_d,
        USE_DOT=use_dot,
    )
    merge_kernel[(tile_meta.shape[0], hkv)](
        part,
        stats,
        out.view(torch.int16) if q.dtype == torch.bfloat16 else out,
        tile_meta,
        out.stride(0),
        out.stride(1),
        hq,
        num_slices,
        d,
        GROUP=group,
        META=tile_meta.shape[1],
        BLOCK_M=block_m,
        SPLIT_KEYS=SPLIT_KEYS,
        BLOCK_D=block_d,
        OUT_BF16=q.dtype == torch.bfloat16,
    )
    return out
