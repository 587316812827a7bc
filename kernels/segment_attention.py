"""Attention of packed segments over the paged KV cache plus the segments' own keys/values.

The PyTorch reference here is written to be *shape-invariant*: a query row's output depends only
on the row and the keys it sees, not on how many other rows, segments or keys share the call. That
is the property that keeps self-speculation lossless (a verify row must equal the AR step that
would have produced it) and lets a request compute the same thing alone or in any batch. It is
achieved the way the Triton kernel does it: keys are processed in fixed-size blocks that start at
key 0 and summed block after block, blocks a row cannot see add exact zeros, and every matrix
product runs on a multiple of ``ROW_MULTIPLE`` rows (CPU BLAS picks other micro-kernels for fewer
rows, which changes rounding; measured on MKL/AVX2): query rows are padded until the rows of all
query heads sharing a KV head, packed into one matrix, are a multiple of it.

What a step's attention needs is built once per step (:class:`AttentionMetadata`), not per layer:
a segment's queries see a key list that is its cached prefix followed by its own rows, and what a
query row sees is always a prefix of that list, so visibility is one count per row. The reference
groups segments by padded row count and runs each group as one batched computation (no Python
loop over segments); the Triton kernel reads the same description as tiles.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from kernels.masks import MaskKind
from kernels.matmul import ROW_MULTIPLE

KEY_BLOCK = 64


@dataclass(frozen=True)
class AttentionSegment:
    """Where a segment's queries sit in the packed batch and what they see."""

    q_start: int
    q_len: int
    prefix_len: int  # cached tokens visible to every query (their slots: AttentionMetadata.prefix_slots)
    kind: MaskKind

    def limits(self) -> list[int]:
        """How many keys of the list (cached prefix, then the segment's rows) each query row sees."""
        p, n = self.prefix_len, self.q_len
        if self.kind is MaskKind.CAUSAL:
            return list(range(p + 1, p + n + 1))
        return [p + n] * n


class AttentionMetadata:
    """One step's attention description, shared by every layer.

    ``prefix_slots`` [S, P] holds, in row s, the flat cache slots of segment s's prefix (entries past
    its ``prefix_len`` are 0 and never read). Backends derive their own forms (the reference's
    buckets, the Triton kernel's tiles) once and keep them here for the remaining layers.
    """

    def __init__(self, segments: list[AttentionSegment], prefix_slots: torch.Tensor) -> None:
        self.segments = segments
        self.prefix_slots = prefix_slots
        self._derived: dict[Any, Any] = {}

    @classmethod
    def from_slots(cls, entries: list[tuple[int, int, torch.Tensor, MaskKind]]) -> AttentionMetadata:
        """From ``(q_start, q_len, prefix slots, kind)`` per segment (tests, benchmarks)."""
        width = max((len(slots) for _, _, slots, _ in entries), default=0)
        device = entries[0][2].device if entries else "cpu"
        table = torch.zeros((len(entries), width), dtype=torch.long, device=device)
        segments = []
        for s, (q_start, q_len, slots, kind) in enumerate(entries):
            table[s, : len(slots)] = slots
            segments.append(AttentionSegment(q_start, q_len, len(slots), kind))
        return cls(segments, table)

    def derived(self, key: Any, build: Callable[[], Any]) -> Any:
        """``build()`` once per step and key (e.g. per backend and GQA group), then the kept result."""
        if key not in self._derived:
            self._derived[key] = build()
        return self._derived[key]

    def __getstate__(self) -> dict[str, Any]:  # sent to tensor-parallel ranks: derived forms are rebuilt there
        return {"segments": self.segments, "prefix_slots": self.prefix_slots, "_derived": {}}


@dataclass
class _Bucket:
    """Segments with the same padded row count, computed together: P segments, Qp rows, K keys each."""

    q_index: torch.Tensor  # [P * Qp] packed query row of each (segment, row); padding repeats a real row
    key_slots: torch.Tensor  # [P * K] cache slot of each (segment, key); 0 where the key is an own row or padding
    own_dst: torch.Tensor  # positions in [P * K] that hold the segment's own rows (packed rows out_rows)
    bias: torch.Tensor  # [P, 1, G * Qp, K] 0 where a key is visible, -inf elsewhere; GQA row order (g * Qp + q)
    floor: torch.Tensor  # [P, 1, G * Qp, K] -inf where a key is visible, 0 elsewhere ...
    visible: torch.Tensor  # ... and 1.0 where it is visible, 0.0 elsewhere (see _attend_blocked)
    valid: torch.Tensor  # positions in [P * Qp] that are real rows ...
    out_rows: torch.Tensor  # ... and the packed rows they are written to (segment after segment)
    count: int
    rows: int
    keys: int
    in_order: bool  # its rows are the packed rows 0, 1, ... in order, no padding: no gather or scatter


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _buckets(meta: AttentionMetadata, group: int) -> list[_Bucket]:
    # the products run on group * rows rows (GQA heads packed): that count is kept a multiple of ROW_MULTIPLE
    row_step = ROW_MULTIPLE // math.gcd(group, ROW_MULTIPLE)
    by_rows: dict[int, list[tuple[int, AttentionSegment]]] = defaultdict(list)
    for s, seg in enumerate(meta.segments):
        by_rows[_round_up(seg.q_len, row_step)].append((s, seg))
    # every bucket's index lists go to the device in one copy (a step builds this once, before layer 0)
    shapes: list[tuple[int, list[tuple[int, AttentionSegment]], int, bool]] = []
    lists: list[list[int]] = []
    for qp, members in sorted(by_rows.items()):
        keys = _round_up(max(seg.prefix_len + seg.q_len for _, seg in members), KEY_BLOCK)
        q_index: list[int] = []
        limits: list[int] = []
        own_dst: list[int] = []
        valid: list[int] = []
        out_rows: list[int] = []
        for p, (_, seg) in enumerate(members):
            absolute = range(seg.q_start, seg.q_start + seg.q_len)
            pad = qp - seg.q_len
            q_index += absolute
            q_index += [seg.q_start] * pad
            limits += seg.limits()
            limits += [0] * pad
            valid += range(p * qp, p * qp + seg.q_len)
            out_rows += absolute
            base = p * keys + seg.prefix_len
            own_dst += range(base, base + seg.q_len)
        in_order = q_index == list(range(len(q_index)))
        shapes.append((qp, members, keys, in_order))
        seg_index = [s for s, _ in members]
        prefix = [seg.prefix_len for _, seg in members]
        lists += [q_index, limits, own_dst, valid, out_rows, seg_index, prefix]
    device = meta.prefix_slots.device
    flat = torch.tensor([v for values in lists for v in values], dtype=torch.long).to(device)
    parts = iter(flat.split_with_sizes([len(values) for values in lists]))
    widest = max(keys for _, _, keys, _ in shapes)
    table = meta.prefix_slots
    if table.shape[1] < widest:
        table = F.pad(table, (0, widest - table.shape[1]))
    cols = torch.arange(widest, device=device)
    zero = torch.zeros((), device=device)
    out = []
    for qp, members, keys, in_order in shapes:
        q_index, limits, own_dst, valid, out_rows, seg_index, prefix = (next(parts) for _ in range(7))
        count = len(members)
        key_slots = table[seg_index, :keys].masked_fill(cols[None, :keys] >= prefix[:, None], 0)
        limit = limits.view(count, 1, qp).expand(count, group, qp).reshape(count, 1, group * qp, 1)
        hidden = cols[:keys].view(1, 1, 1, keys) >= limit
        out.append(
            _Bucket(
                q_index=q_index,
                key_slots=key_slots.reshape(-1),
                own_dst=own_dst,
                bias=zero.masked_fill(hidden, float("-inf")),
                floor=zero.masked_fill(~hidden, float("-inf")),
                visible=(~hidden).float(),
                valid=valid,
                out_rows=out_rows,
                count=count,
                rows=qp,
                keys=keys,
                in_order=in_order,
            )
        )
    return out


def _attend_blocked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, b: _Bucket, scale: float) -> torch.Tensor:
    """q [P, Hkv, M, D] (GQA heads of one KV head packed), k/v [P, Hkv, blocks*KEY_BLOCK, D], and the
    bucket's masks (broadcast over Hkv) -> [P, Hkv, M, D].

    Scores come from one product (a row's dot products do not depend on the number of keys);
    the softmax sums and the probability-value products run per fixed-size key block and are
    added block after block, so blocks a row cannot see add exact zeros.
    """
    count, hkv, m_rows, d = q.shape
    blocks = k.shape[2] // KEY_BLOCK
    s = torch.matmul(q, k.transpose(-1, -2)).mul_(scale).add_(b.bias)
    m = s.amax(dim=-1, keepdim=True).clamp_(min=torch.finfo(s.dtype).min)  # fully masked (padding) rows
    # Hidden keys get an exact 0 without an exponential of -inf: PyTorch's CPU exp takes a slow path
    # for -inf and for underflowing values (measured on [12, 2, 32, 64] scores: 4x the time with 14%
    # of the keys hidden, 9x with half). They are raised to 0 (visible ones are unchanged),
    # exponentiated, then zeroed.
    p = s.sub_(m).clamp_(min=b.floor).exp_().mul_(b.visible)
    if blocks == 1:
        total = p.sum(dim=-1, keepdim=True)
        acc = torch.matmul(p, v)
        return acc.div_(total.clamp_(min=1.0))
    p = p.view(count, hkv, m_rows, blocks, KEY_BLOCK)
    block_sums = p.sum(dim=-1)  # [P, Hkv, M, blocks]
    p_blocks = p.permute(0, 1, 3, 2, 4).reshape(count * hkv * blocks, m_rows, KEY_BLOCK)
    v_blocks = v.reshape(count * hkv * blocks, KEY_BLOCK, d)
    partial = torch.matmul(p_blocks, v_blocks).view(count, hkv, blocks, m_rows, d)
    total, acc = block_sums[..., 0], partial[:, :, 0]
    for i in range(1, blocks):
        total = total + block_sums[..., i]
        acc = acc + partial[:, :, i]
    # a row that sees a key sums to at least 1 (its maximum contributes exp(0)); padding rows sum to 0
    return acc / total.unsqueeze(-1).clamp_(min=1.0)


def _bucket_keys(cache: torch.Tensor, own: torch.Tensor, b: _Bucket, direct: bool) -> torch.Tensor:
    """The bucket's keys (or values) as [P, Hkv, K, D] fp32, contiguous: its segments' cached rows with
    their own rows (``own`` [T, Hkv, D], the cache's dtype) in place; widened and transposed in one copy,
    which also spares the score product a copy of its own. ``direct``: the bucket's rows are all of
    ``own``'s, in order (none is gathered)."""
    own_rows = own if direct else own.index_select(0, b.out_rows)
    rows = cache.index_select(0, b.key_slots).index_copy_(0, b.own_dst, own_rows)
    hkv, d = rows.shape[1:]
    shaped = torch.empty((b.count, hkv, b.keys, d), dtype=torch.float32, device=rows.device)
    return shaped.copy_(rows.view(b.count, b.keys, hkv, d).transpose(1, 2))


def segment_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """q [T, Hq, D]; k, v [T, Hkv, D] of this step; caches [slots, Hkv, D] -> out [T, Hq, D] (q's dtype).

    Computation is in fp32 whatever the storage dtype. Rows that no segment covers are left unset.
    """
    t_total, hq, d = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    out = torch.empty((t_total, hq, d), dtype=q.dtype, device=q.device)
    qf = q.float()
    for b in meta.derived(("reference", group), lambda: _buckets(meta, group)):
        direct = b.in_order and b.count * b.rows == t_total  # one bucket holding every row: no copies
        qs = (qf if direct else qf.index_select(0, b.q_index)).view(b.count, b.rows, hkv, group, d)
        qs = qs.permute(0, 2, 3, 1, 4).reshape(b.count, hkv, group * b.rows, d)
        keys = _bucket_keys(k_cache, k, b, direct)
        vals = _bucket_keys(v_cache, v, b, direct)
        res = _attend_blocked(qs, keys, vals, b, scale)  # [P, Hkv, G*Qp, D]
        res = res.view(b.count, hkv, group, b.rows, d).permute(0, 3, 1, 2, 4).reshape(-1, hq, d)
        if direct:
            return res.to(q.dtype)
        out.index_copy_(0, b.out_rows, res.index_select(0, b.valid).to(q.dtype))
    return out
