"""One engine step: pack the segments of many requests, run one forward, hand back the logits.

Both the single-request ``generate`` and the batching engine go through ``run_step``, so a request
computes exactly the same thing alone or in a batch.
"""

from __future__ import annotations

import torch

from models.batch import pack
from models.kv_cache import PagedKVCache
from models.model import TriModeModel
from models.modes import DecodeState
from models.segments import Segment


def write_extent(segments: list[Segment]) -> int:
    """Cache length the segments write up to (pages must be reserved before the forward)."""
    ends = [p + 1 for seg in segments for p, w in zip(seg.positions, seg.write) if w]
    return max(ends, default=0)


def run_step(
    model: TriModeModel,
    cache: PagedKVCache,
    requests: list[tuple[int, DecodeState]],
    plans: list[list[Segment]] | None = None,
) -> list[list[int]]:
    """Advance every (sequence id, state) by one forward; return each request's new tokens.

    ``plans`` may pass segments already planned (the engine plans first to reserve pages).
    The cache is rolled back to each state's committed length afterwards.
    """
    if plans is None:
        plans = [state.plan() for _, state in requests]
    items: list[tuple[int, Segment]] = []
    for (seq_id, _), segments in zip(requests, plans):
        cache.reserve(seq_id, max(write_extent(segments), cache.length(seq_id)))
        items.extend((seq_id, seg) for seg in segments)
    batch = pack(items, cache, device=model.device)
    logits = model(batch, cache)  # stays on the device: the modes reduce it there (kernels.unmask, verify_accept)
    pieces = list(torch.split(logits, batch.logit_counts))
    emitted: list[list[int]] = []
    for (seq_id, state), segments in zip(requests, plans):
        own, pieces = pieces[: len(segments)], pieces[len(segments) :]
        emitted.append(state.advance(own))
        cache.set_length(seq_id, state.cached_len)
    return emitted
