"""Random segment-attention calls over a paged cache, shared by the tests of every attention backend."""

from __future__ import annotations

import torch

from kernels.masks import MaskKind
from kernels.segment_attention import AttentionMetadata

Layout = list[tuple[MaskKind, int, int]]  # (kind, cached prefix length, segment length) per segment


def attention_case(layout: Layout, slots: int, hq: int, hkv: int, d: int, dtype: torch.dtype, seed: int = 0):
    """q, k, v of the step's rows, key and value caches of ``slots`` slots, the step's metadata (each
    prefix scattered over the cache, as paging leaves it) and the softmax scale."""
    gen = torch.Generator().manual_seed(seed)
    total = sum(n for _, _, n in layout)
    q, k, v = (torch.randn(total, h, d, generator=gen).to(dtype) for h in (hq, hkv, hkv))
    k_cache, v_cache = (torch.randn(slots, hkv, d, generator=gen).to(dtype) for _ in range(2))
    entries, start = [], 0
    for kind, prefix, n in layout:
        entries.append((start, n, torch.randperm(slots, generator=gen)[:prefix], kind))
        start += n
    return q, k, v, k_cache, v_cache, AttentionMetadata.from_slots(entries), d**-0.5
