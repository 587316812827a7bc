"""Attention visibility of packed segments, shared by the kernels and their references."""

from __future__ import annotations

from enum import Enum

import torch


class MaskKind(str, Enum):
    """What the queries of a segment see of the segment itself (the cached prefix is always visible)."""

    CAUSAL = "causal"  # prefill, AR, verify: query t sees own tokens 0..t
    BIDIRECTIONAL = "bidirectional"  # diffusion step, draft: every query sees the whole segment


def segment_mask(kind: MaskKind, q_len: int, prefix_len: int, device=None) -> torch.Tensor:
    """Boolean [q_len, prefix_len + q_len] visibility of keys (cached prefix, then the segment's own)."""
    own = torch.ones(q_len, q_len, dtype=torch.bool, device=device)
    if kind is MaskKind.CAUSAL:
        own = torch.tril(own)
    prefix = torch.ones(q_len, prefix_len, dtype=torch.bool, device=device)
    return torch.cat([prefix, own], dim=1)
