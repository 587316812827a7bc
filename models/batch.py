"""Packing the segments of one engine step into the flat tensors of a single forward pass.

Everything a step's forward needs is built here once: token ids and positions, the cache slots of
the rows whose keys/values are committed, and the attention metadata every layer shares. The
host sends one list of integers to the device; slots are then looked up in the KV manager's
block table on the device, so no per-request slot list is rebuilt or copied.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
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
    position_limit: int  # one past the largest position (sizes the RoPE table without a device sync)
    deferred_rows: torch.Tensor | None = None  # rows whose logits may be asked for after the forward
    # which logit rows (positions in ``logit_rows``) and deferred rows take the draft adapter: a draft's
    # head may be a product of its own (TriModeModel.int8_drafts); empty where none do
    logit_drafts: list[int] = field(default_factory=list)
    deferred_drafts: list[int] = field(default_factory=list)
    embed_rows: torch.Tensor | None = None  # rows whose embeddings are replaced (images) ...
    embed_values: torch.Tensor | None = None  # ... by these vectors

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.numel())


def table_slots(table: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor, page_size: int) -> torch.Tensor:
    """Flat cache slots of ``positions`` of the sequences at block-table ``rows`` (broadcast together),
    looked up on the device."""
    return page_slots(table, rows, positions // page_size, positions % page_size, page_size)


def page_slots(
    table: torch.Tensor, rows: torch.Tensor, pages: torch.Tensor, offsets: torch.Tensor, page_size: int
) -> torch.Tensor:
    """``table_slots`` of positions already split into their page (column of the block table) and their
    offset in it: where the host knows the positions, it splits them and spares the device two
    operations (on a CPU, a few microseconds each)."""
    return table[rows, pages] * page_size + offsets


@functools.cache
def _columns(width: int, page_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Positions 0..width-1 with their pages and offsets, made once per width (a power of two)."""
    cols = torch.arange(width, device=device)
    return cols, cols // page_size, cols % page_size


def pack(items: list[tuple[int, Segment]], kv: KVCacheManager, device: torch.device | str = "cpu") -> StepBatch:
    """Pack ``(sequence id, segment)`` pairs. Pages for written positions must be reserved."""
    page_size = kv.page_size
    tokens: list[int] = []
    positions: list[int] = []
    write_rows: list[int] = []
    write_tables: list[int] = []  # of each written token: its sequence's block-table row, ...
    write_pages: list[int] = []  # ... the page its position is in, ...
    write_offsets: list[int] = []  # ... and its offset there
    adapter_rows: list[int] = []
    logit_rows: list[int] = []
    deferred_rows: list[int] = []
    logit_drafts: list[int] = []
    deferred_drafts: list[int] = []
    segment_rows: list[int] = []
    segments: list[AttentionSegment] = []
    embed_rows: list[int] = []
    embed_values: list[torch.Tensor] = []
    for seq_id, seg in items:
        start, n, row = len(tokens), len(seg), kv.row(seq_id)
        tokens += seg.tokens
        positions += seg.positions
        written = [i for i, w in enumerate(seg.write) if w]
        write_rows += [start + i for i in written]
        write_tables += [row] * len(written)
        write_pages += [seg.positions[i] // page_size for i in written]
        write_offsets += [seg.positions[i] % page_size for i in written]
        adapter_rows += [start + i for i, a in enumerate(seg.adapter) if a]
        rows = seg.read_rows
        if any(seg.adapter):
            logit_drafts += [len(logit_rows) + i for i, r in enumerate(rows) if seg.adapter[r]]
            deferred_drafts += [len(deferred_rows) + i for i, r in enumerate(seg.deferred_rows or ()) if seg.adapter[r]]
        logit_rows += [start + r for r in rows]
        deferred_rows += [start + r for r in seg.deferred_rows or ()]
        segment_rows.append(row)
        segments.append(AttentionSegment(start, n, seg.prefix_len, seg.kind))
        if seg.input_embeds is not None:
            embed_rows += [start + r for r in seg.embeds_rows]
            embed_values.append(seg.input_embeds)
    prefix_lens = [seg.prefix_len for seg in segments]
    lists = [tokens, positions, write_rows, write_tables, write_pages, write_offsets, adapter_rows, logit_rows]
    lists += [deferred_rows, segment_rows, prefix_lens, embed_rows]
    flat = [value for values in lists for value in values]
    parts = torch.tensor(flat, dtype=torch.long).to(device).split_with_sizes([len(values) for values in lists])
    tok, pos, write, write_table, write_page, write_offset, adapter, logit, deferred, seg_row, prefix_len, embed = parts
    table = kv.block_table
    write_slots = page_slots(table, write_table, write_page, write_offset, page_size)
    widest = max(prefix_lens, default=0)
    cols, pages, offsets = (c[:widest] for c in _columns(1 << max(widest - 1, 0).bit_length(), page_size, pos.device))
    prefix_slots = page_slots(table, seg_row[:, None], pages[None, :], offsets[None, :], page_size)
    prefix_slots = prefix_slots.masked_fill(cols >= prefix_len[:, None], 0)
    return StepBatch(
        tokens=tok,
        positions=pos,
        attention=AttentionMetadata(segments, prefix_slots),
        write_rows=write,
        write_slots=write_slots,
        adapter_rows=adapter,
        logit_rows=logit,
        position_limit=max(positions, default=0) + 1,
        deferred_rows=deferred if deferred_rows else None,
        logit_drafts=logit_drafts,
        deferred_drafts=deferred_drafts,
        embed_rows=embed if embed_rows else None,
        embed_values=torch.cat(embed_values).to(device) if embed_values else None,
    )
