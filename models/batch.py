"""Packing the segments of one engine step into the flat tensors of a single forward pass.

Everything a step's forward needs is built here once: token ids and positions, the cache slots of
the rows whose keys/values are committed, and the attention metadata every layer shares. The
host sends one list of integers to the device; slots are then looked up in the KV manager's
block table on the device, so no per-request slot list is rebuilt or copied.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from kernels import AttentionMetadata, AttentionSegment
from models.segments import Segment

if TYPE_CHECKING:
    from models.engine.kv_manager import KVCacheManager


@dataclass
class StepBatch:
    """All query tokens of a step, flattened, plus where their keys/values and outputs go."""

    tokens: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    attention: AttentionMetadata
    write_rows: torch.Tensor  # [W] rows whose keys/values are stored ...
    write_slots: torch.Tensor  # [W] ... in these cache slots
    adapter_rows: torch.Tensor  # [A] rows that get the draft adapter
    logit_rows: torch.Tensor  # [R] rows whose logits the forward returns, segment after segment
    logit_counts: list[int]  # rows of logits per segment
    position_limit: int  # one past the largest position (sizes the RoPE table without a device sync)
    deferred_rows: torch.Tensor | None = None  # rows whose logits may be asked for after the forward
    deferred_counts: list[int] | None = None  # deferred rows per segment
    embed_rows: torch.Tensor | None = None  # rows whose embeddings are replaced (images) ...
    embed_values: torch.Tensor | None = None  # ... by these vectors

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.numel())


def table_slots(table: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor, page_size: int) -> torch.Tensor:
    """Flat cache slots of ``positions`` of the sequences at block-table ``rows`` (broadcast together),
    looked up on the device."""
    return table[rows, positions // page_size] * page_size + positions % page_size


def pack(items: list[tuple[int, Segment]], kv: KVCacheManager, device: torch.device | str = "cpu") -> StepBatch:
    """Pack ``(sequence id, segment)`` pairs. Pages for written positions must be reserved."""
    tokens: list[int] = []
    positions: list[int] = []
    token_rows: list[int] = []  # block-table row of each token's sequence
    write_rows: list[int] = []
    adapter_rows: list[int] = []
    logit_rows: list[int] = []
    logit_counts: list[int] = []
    deferred_rows: list[int] = []
    deferred_counts: list[int] = []
    segment_rows: list[int] = []
    segments: list[AttentionSegment] = []
    embed_rows: list[int] = []
    embed_values: list[torch.Tensor] = []
    for seq_id, seg in items:
        start, n, row = len(tokens), len(seg), kv.row(seq_id)
        tokens += seg.tokens
        positions += seg.positions
        token_rows += [row] * n
        write_rows += [start + i for i, w in enumerate(seg.write) if w]
        adapter_rows += [start + i for i, a in enumerate(seg.adapter) if a]
        rows = range(n) if seg.logit_rows is None else seg.logit_rows
        logit_rows += [start + r for r in rows]
        logit_counts.append(len(rows))
        deferred_rows += [start + r for r in seg.deferred_rows or ()]
        deferred_counts.append(len(seg.deferred_rows or ()))
        segment_rows.append(row)
        segments.append(AttentionSegment(start, n, seg.prefix_len, seg.kind))
        if seg.input_embeds is not None:
            embed_rows += [start + r for r in seg.embeds_rows]
            embed_values.append(seg.input_embeds)
    sizes = [len(tokens), len(positions), len(token_rows), len(write_rows), len(adapter_rows)]
    prefix_lens = [seg.prefix_len for seg in segments]
    sizes += [len(logit_rows), len(deferred_rows), len(segment_rows), len(prefix_lens), len(embed_rows)]
    flat = tokens + positions + token_rows + write_rows + adapter_rows + logit_rows + deferred_rows
    flat += segment_rows + prefix_lens + embed_rows
    parts = torch.tensor(flat, dtype=torch.long).to(device).split_with_sizes(sizes)
    tok, pos, tok_row, write, adapter, logit, deferred, seg_row, prefix_len, embed = parts
    table = kv.block_table
    page_size = kv.page_size
    written = pos[write]
    write_slots = table_slots(table, tok_row[write], written, page_size)
    cols = torch.arange(max(prefix_lens, default=0), device=device)
    prefix_slots = table_slots(table, seg_row[:, None], cols[None, :], page_size)
    prefix_slots = prefix_slots.masked_fill(cols >= prefix_len[:, None], 0)
    return StepBatch(
        tokens=tok,
        positions=pos,
        attention=AttentionMetadata(segments, prefix_slots),
        write_rows=write,
        write_slots=write_slots,
        adapter_rows=adapter,
        logit_rows=logit,
        logit_counts=logit_counts,
        position_limit=max(positions, default=0) + 1,
        deferred_rows=deferred if deferred_rows else None,
        deferred_counts=deferred_counts if deferred_rows else None,
        embed_rows=embed if embed_rows else None,
        embed_values=torch.cat(embed_values).to(device) if embed_values else None,
    )
