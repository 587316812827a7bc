"""Attention visibility of packed segments, shared by the kernels and their references."""

from __future__ import annotations

from enum import Enum

import torch


class MaskKind(str, Enum):
    """What the queries of a segment see of the segment itself (the cached prefix is always visible)."""

    CAUSAL = "causal"  # prefill, AR, verify: query t sees own tokens 0..t
    BIDIRECTIONAL = "bidirectional"  # diffusion step, draft: every query sees the whole segment
    QUADRATIC = "quadratic"  # quadratic self-speculation cycle, see quadratic_layout()


def quadratic_layout(num_verify: int, sub_block: int) -> tuple[list[int], list[bool]]:
    """Offsets (from the first verify token's position) and verify flags of a quadratic cycle.

    The cycle is ``[d_0, M x L, d_1, M x L, ...]``: d_j sits at offset j, its L mask slots at
    offsets j+1 .. j+L (they draft the L tokens after d_j, assuming d_0..d_j are accepted).
    """
    offsets: list[int] = []
    is_verify: list[bool] = []
    for j in range(num_verify):
        offsets.append(j)
        is_verify.append(True)
        offsets.extend(range(j + 1, j + sub_block + 1))
        is_verify.extend([False] * sub_block)
    return offsets, is_verify


def segment_mask(kind: MaskKind, q_len: int, prefix_len: int, sub_block: int = 0, device=None) -> torch.Tensor:
    """Boolean [q_len, prefix_len + q_len] visibility of keys (cached prefix, then the segment's own)."""
    own = torch.ones(q_len, q_len, dtype=torch.bool, device=device)
    if kind is MaskKind.CAUSAL:
        own = torch.tril(own)
    elif kind is MaskKind.QUADRATIC:
        group = sub_block + 1
        if q_len % group:
            raise ValueError("quadratic segment length must be a multiple of sub_block + 1")
        idx = torch.arange(q_len, device=device)
        block = idx // group  # sub-block j of each row/column
        is_verify = idx % group == 0
        # queries see verify tokens d_0..d_j of their own sub-block index j ...
        sees_verify = is_verify[None, :] & (block[None, :] <= block[:, None])
        # ... and mask slots see their own sub-block's mask slots (bidirectionally)
        sees_own_masks = (~is_verify[:, None]) & (~is_verify[None, :]) & (block[None, :] == block[:, None])
        own = sees_verify | sees_own_masks
    prefix = torch.ones(q_len, prefix_len, dtype=torch.bool, device=device)
    return torch.cat([prefix, own], dim=1)
