"""Attention of packed segments over the paged KV cache plus the segments' own keys/values.

The PyTorch reference here is written to be *shape-invariant*: a query row's output depends only
on the row and the keys it sees, not on how many other rows or keys share the call. That is the
property that keeps self-speculation lossless (a verify row must equal the AR step that would have
produced it). It is achieved the way the Triton kernel does it: keys are processed in fixed-size
blocks that start at key 0 and summed block after block, blocks a row cannot see change
nothing, and every matrix product runs on a multiple of ``ROW_MULTIPLE`` rows (CPU BLAS picks
other micro-kernels for ragged row counts, which changes rounding; measured on MKL/AVX2).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kernels.masks import MaskKind, segment_mask

KEY_BLOCK = 64
ROW_MULTIPLE = 4


@dataclass(eq=False)
class AttentionSegment:
    """Where a segment's queries sit in the packed batch and what they see."""

    q_start: int
    q_len: int
    prefix_slots: torch.Tensor  # [prefix_len] flat cache slots of the visible prefix, in order
    kind: MaskKind
    sub_block: int = 0
    _pieces: dict[int, list[AttentionPiece]] = field(default_factory=dict, repr=False)

    @property
    def prefix_len(self) -> int:
        return int(self.prefix_slots.numel())

    def pieces(self, group: int) -> list[AttentionPiece]:
        """The attention calls of this segment, masks in GQA-packed row order (built once per step).

        A quadratic segment is split per sub-block: sub-block j's queries only ever see the prefix,
        d_0..d_j and their own mask slots, so each call stays small, and d_j sees its keys at the
        same places as the AR step that would have produced it.
        """
        if group not in self._pieces:
            self._pieces[group] = [piece.packed(group) for piece in self._plain_pieces()]
        return self._pieces[group]

    def _plain_pieces(self) -> list[AttentionPiece]:
        device = self.prefix_slots.device
        if self.kind is not MaskKind.QUADRATIC:
            every = torch.arange(self.q_len, device=device)
            mask = segment_mask(self.kind, self.q_len, self.prefix_len, self.sub_block, device=device)
            return [AttentionPiece(every, every, mask)]
        group_len = self.sub_block + 1
        out = []
        for j in range(self.q_len // group_len):
            rows = torch.arange(j * group_len, (j + 1) * group_len, device=device)
            verify = torch.arange(0, (j + 1) * group_len, group_len, device=device)
            key_rows = torch.cat([verify, rows[1:]])
            mask = torch.ones(group_len, self.prefix_len + len(key_rows), dtype=torch.bool, device=device)
            mask[0, self.prefix_len + j + 1 :] = False  # d_j sees the prefix and d_0..d_j only
            out.append(AttentionPiece(rows, key_rows, mask))
        return out


@dataclass
class AttentionPiece:
    """Query rows of a segment, the segment rows they use as keys (after the prefix), and visibility."""

    rows: torch.Tensor
    key_rows: torch.Tensor
    mask: torch.Tensor  # [rows, prefix + key rows]; packed(): padded to blocks, GQA row order

    def packed(self, group: int) -> AttentionPiece:
        keys = -(-self.mask.shape[1] // KEY_BLOCK) * KEY_BLOCK
        mask = torch.nn.functional.pad(self.mask, (0, keys - self.mask.shape[1]))
        return AttentionPiece(self.rows, self.key_rows, pad_rows(mask).repeat(group, 1))


def pad_rows(x: torch.Tensor) -> torch.Tensor:
    """Pad the first dimension with zeros up to a multiple of ``ROW_MULTIPLE``."""
    extra = -x.shape[0] % ROW_MULTIPLE
    if not extra:
        return x
    pad = x.new_zeros((extra, *x.shape[1:]))
    return torch.cat([x, pad], dim=0)


def _attend_blocked(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """q [Hkv, G*Q, D] (GQA heads of one KV head packed), k/v [Hkv, blocks*KEY_BLOCK, D],
    mask [G*Q, blocks*KEY_BLOCK] -> [Hkv, G*Q, D].

    Scores come from one product (a row's dot products do not depend on the number of keys);
    the softmax sums and the probability-value products run per fixed-size key block and are
    added block after block, so blocks a row cannot see add exact zeros.
    """
    hkv, gq, d = q.shape
    blocks = k.shape[1] // KEY_BLOCK
    s = (torch.matmul(q, k.transpose(1, 2)) * scale).masked_fill(~mask, float("-inf"))
    m = s.amax(dim=-1, keepdim=True)
    m = m.masked_fill(torch.isinf(m), 0.0)  # fully masked (padding) rows
    p = torch.exp(s - m).view(hkv, gq, blocks, KEY_BLOCK)
    block_sums = p.sum(dim=-1)  # [Hkv, GQ, blocks]
    p_blocks = p.permute(0, 2, 1, 3).reshape(hkv * blocks, gq, KEY_BLOCK)
    partial = torch.matmul(p_blocks, v.reshape(hkv * blocks, KEY_BLOCK, d)).view(hkv, blocks, gq, d)
    total, acc = block_sums[..., 0], partial[:, 0]
    for i in range(1, blocks):
        total = total + block_sums[..., i]
        acc = acc + partial[:, i]
    total = total.unsqueeze(-1)
    return acc / total.masked_fill(total == 0, 1.0)


def segment_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    segments: list[AttentionSegment],
    scale: float,
) -> torch.Tensor:
    """q [T, Hq, D]; k, v [T, Hkv, D] of this step; caches [slots, Hkv, D] -> out [T, Hq, D] (q's dtype).

    Computation is in fp32 whatever the storage dtype.
    """
    t_total, hq, d = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    out = torch.empty((t_total, hq, d), dtype=q.dtype, device=q.device)
    for seg in segments:
        prefix_k, prefix_v = k_cache[seg.prefix_slots], v_cache[seg.prefix_slots]
        for piece in seg.pieces(group):
            rows, key_rows = piece.rows + seg.q_start, piece.key_rows + seg.q_start
            pad = piece.mask.shape[1] - seg.prefix_len - len(key_rows)  # masked padding: any slot will do
            keys = torch.cat([prefix_k, k[key_rows], k_cache[:1].expand(pad, -1, -1)], dim=0).float()
            vals = torch.cat([prefix_v, v[key_rows], v_cache[:1].expand(pad, -1, -1)], dim=0).float()
            qs = pad_rows(q[rows].float())  # [Qp, Hq, D]
            qp = qs.shape[0]
            # [Qp, Hkv, G, D] -> [Hkv, G*Qp, D]: heads sharing a KV head become one tall matrix
            packed = qs.view(qp, hkv, group, d).permute(1, 2, 0, 3).reshape(hkv, group * qp, d)
            res = _attend_blocked(packed, keys.transpose(0, 1), vals.transpose(0, 1), piece.mask, scale)
            out[rows] = res.view(hkv, group, qp, d).permute(2, 0, 1, 3).reshape(qp, hq, d)[: len(rows)].to(q.dtype)
    return out
