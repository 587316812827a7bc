"""CUDA graphs for steps of AR decodes: one captured forward per bucket of request counts.

A step in which every request takes one AR token (every step of a lone AR request, most steps of a
busy server) launches some hundreds of small kernels, and for small models and batches a GPU spends
longer launching them than running them. Such a step replays a CUDA graph instead: for each bucket
of request counts (``BUCKETS`` up to the engine's ``max_running``) the forward is captured once, when
the engine is built, over static inputs (token, position and block-table row per request). The
step's cache slots and attention metadata are computed inside the graph from those inputs and the
KV manager's block table, which is updated in place and so read current at every replay. Requests
are padded to the bucket with copies of the first one: a copy writes the same keys and values to the
same slot, and its logits are dropped.

Lossless by construction: a replay runs the same kernels as the eager step (the Triton backend,
whose results for a row do not depend on the other rows of the call) on the same rows, so a
request's logits are bit-identical to the eager step's and self-speculation's verify rows still
match them. Steps with anything else (prefill chunks, blocks, images, a request past
``MAX_CONTEXT``) run eagerly. Where no GPU is present (``capture=False``, the tests) the same static
step runs eagerly: what a GPU adds is only the capture and the replay.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import kernels
from kernels.triton_segment_attention import decode_metadata
from models.batch import StepBatch, table_slots
from models.engine.kv_manager import KVCacheManager
from models.kv_cache import PagedKVCache
from models.modes import DecodeState, Plan
from models.segments import MaskKind

BUCKETS = (1, 2, 4, 8, 16, 32, 64)
MAX_CONTEXT = 8192  # keys a graphed row may see: every replay computes this many slots per request


def decode_row(plan: Plan) -> tuple[int, int] | None:
    """(token, position) when ``plan`` is one AR token right after its cached prefix, written to the
    cache, its logits read, nothing else (no adapter, image or deferred rows); else None."""
    if len(plan.segments) != 1:
        return None
    seg = plan.segments[0]
    plain = seg.write == [True] and seg.adapter == [False] and seg.input_embeds is None and not seg.deferred_rows
    if len(seg) == 1 and seg.kind is MaskKind.CAUSAL and plain and seg.logit_rows in (None, [0]):
        if seg.prefix_len == seg.positions[0]:
            return seg.tokens[0], seg.positions[0]
    return None


@dataclass
class _Bucket:
    inputs: torch.Tensor  # [3, size] int64: tokens, positions, block-table rows
    graph: torch.cuda.CUDAGraph | None = None
    logits: torch.Tensor | None = None  # the captured forward's output, overwritten by each replay


class DecodeGraphs:
    """The decode-step graphs of one engine (its model, cache pool and KV manager). ``capture`` (default:
    on a CUDA device) records them when built; without it the static step runs eagerly (the tests)."""

    def __init__(
        self, model, cache: PagedKVCache, kv: KVCacheManager, max_batch: int, *, capture: bool | None = None
    ) -> None:
        if kernels.backend(model.device) != "triton":
            raise ValueError("decode graphs run the Triton kernels (on CUDA, or forced with TRISERVE_KERNELS=triton)")
        self.model, self.cache, self.kv = model, cache, kv
        self.table = kv.block_table  # updated in place, never replaced: the graphs read it at every replay
        self.width = min(self.table.shape[1], -(-MAX_CONTEXT // kv.page_size)) * kv.page_size
        attn = model.encoder.layers[0].self_attn
        self.group = attn.num_heads // attn.num_kv_heads
        device = model.device
        self.cols = torch.arange(self.width, device=device)
        sizes = sorted({b for b in BUCKETS if b < max_batch} | {min(max_batch, BUCKETS[-1])})
        self.buckets = {b: _Bucket(torch.zeros((3, b), dtype=torch.long, device=device)) for b in sizes}
        if capture if capture is not None else device.type == "cuda":
            self._capture()

    def _forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """The forward of a bucket's step, from its static inputs only (what the graph records)."""
        tokens, positions, rows = inputs
        page = self.kv.page_size
        rows_index = torch.arange(tokens.shape[0], device=tokens.device)
        prefix_slots = table_slots(self.table, rows[:, None], self.cols[None, :], page)
        batch = StepBatch(
            tokens=tokens,
            positions=positions,
            attention=decode_metadata(positions, prefix_slots, self.group),
            write_rows=rows_index,
            write_slots=table_slots(self.table, rows, positions, page),
            adapter_rows=rows_index[:0],
            logit_rows=rows_index,
            logit_counts=[1] * tokens.shape[0],
            position_limit=self.width,
        )
        return self.model(batch, self.cache)

    def _capture(self) -> None:
        """Capture every bucket, largest first, in one memory pool. Each is run twice beforehand (on a
        side stream, as capture requires): kernels compile and fused weights are prepared outside the
        graph. Those runs write the keys of token 0 at position 0 into the slot that block-table row 0
        maps position 0 to; no sequence holds pages yet, and a slot is always written before it is read."""
        pool = torch.cuda.graph_pool_handle()
        for size in sorted(self.buckets, reverse=True):
            bucket = self.buckets[size]
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    self._forward(bucket.inputs)
            torch.cuda.current_stream().wait_stream(side)
            bucket.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(bucket.graph, pool=pool):
                bucket.logits = self._forward(bucket.inputs)

    def run(self, scheduled: list[tuple[int, Plan, DecodeState]]) -> torch.Tensor | None:
        """The logits [len(scheduled), vocab] of a step whose plans are all ``decode_row``s and which
        fits a bucket (the graph's output buffer: read it before the next step); None otherwise."""
        rows = [decode_row(plan) for _, plan, _ in scheduled]
        count = len(rows)
        size = min((b for b in self.buckets if b >= count), default=None)
        if size is None or not rows or None in rows or max(p for _, p in rows) >= self.width:
            return None
        table_rows = [self.kv.row(seq_id) for seq_id, _, _ in scheduled]
        pad = size - count
        host = torch.tensor(
            [
                [t for t, _ in rows] + [rows[0][0]] * pad,
                [p for _, p in rows] + [rows[0][1]] * pad,
                table_rows + [table_rows[0]] * pad,
            ]
        )
        bucket = self.buckets[size]
        bucket.inputs.copy_(host)
        if self.kv.block_table is not self.table:  # reading it writes the pages given out since the last step
            raise RuntimeError("the KV manager replaced its block table; the decode graphs read the old one")
        if bucket.graph is None:
            return self._forward(bucket.inputs)[:count]
        bucket.graph.replay()
        return bucket.logits[:count]
