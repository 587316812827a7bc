"""Packing the segments of one engine step into the flat tensors of a single forward pass."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels import AttentionSegment
from models.kv_cache import PagedKVCache
from models.segments import Segment


@dataclass
class PackedBatch:
    """All query tokens of a step, flattened, plus where their keys/values and logits go."""

    tokens: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    attention: list[AttentionSegment]
    write_rows: torch.Tensor  # [W] rows whose keys/values are stored ...
    write_slots: torch.Tensor  # [W] ... in these cache slots
    adapter_rows: torch.Tensor  # [A] rows that get the draft adapter
    logit_rows: torch.Tensor  # [R] rows whose logits are returned, segment after segment
    logit_counts: list[int]  # rows of logits per segment
    embed_rows: torch.Tensor | None = None  # rows whose embeddings are replaced (images) ...
    embed_values: torch.Tensor | None = None  # ... by these vectors

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.numel())


def pack(items: list[tuple[int, Segment]], cache: PagedKVCache, device: torch.device | str = "cpu") -> PackedBatch:
    """Pack ``(sequence id, segment)`` pairs. Cache pages for written positions must be reserved."""
    tokens: list[int] = []
    positions: list[int] = []
    attention: list[AttentionSegment] = []
    write_rows: list[int] = []
    write_slots: list[torch.Tensor] = []
    adapter_rows: list[int] = []
    logit_rows: list[int] = []
    logit_counts: list[int] = []
    embed_rows: list[int] = []
    embed_values: list[torch.Tensor] = []
    for seq_id, seg in items:
        start = len(tokens)
        tokens.extend(seg.tokens)
        positions.extend(seg.positions)
        prefix_slots = cache.slots(seq_id, range(seg.prefix_len))
        attention.append(AttentionSegment(start, len(seg), prefix_slots, seg.kind, seg.sub_block))
        written = [i for i, w in enumerate(seg.write) if w]
        if written:
            write_rows.extend(start + i for i in written)
            write_slots.append(cache.slots(seq_id, [seg.positions[i] for i in written]))
        adapter_rows.extend(start + i for i, a in enumerate(seg.adapter) if a)
        rows = range(len(seg)) if seg.logit_rows is None else seg.logit_rows
        logit_rows.extend(start + r for r in rows)
        logit_counts.append(len(rows))
        if seg.input_embeds is not None:
            embed_rows.extend(start + r for r in seg.embeds_rows)
            embed_values.append(seg.input_embeds)

    def as_long(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=device)

    return PackedBatch(
        tokens=as_long(tokens),
        positions=as_long(positions),
        attention=attention,
        write_rows=as_long(write_rows),
        write_slots=torch.cat(write_slots).to(device) if write_slots else as_long([]),
        adapter_rows=as_long(adapter_rows),
        logit_rows=as_long(logit_rows),
        logit_counts=logit_counts,
        embed_rows=as_long(embed_rows) if embed_rows else None,
        embed_values=torch.cat(embed_values).to(device) if embed_values else None,
    )
