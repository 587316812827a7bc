"""CUDA graphs for engine steps whose requests all plan segments of one shape.

A step launches some hundreds of small kernels, and for small models and batches a GPU spends longer
launching them than running them. Most steps of a request at batch size 1 have one of a few shapes:
an AR token, a draft block, a verify window, a quadratic cycle (a verify and its branches' drafts), a
diffusion denoise pass or block commit. A step in which every request plans segments of the same
``StepShape`` (per segment: rows, mask kind, written or not, draft adapter or not, logits read or not,
deferred rows; each segment's rows at consecutive positions right after its cached prefix) replays a
CUDA graph of the forward instead. A graph is captured per shape and bucket of request counts
(``BUCKETS``) over static inputs: each request's tokens, the first position of each of its segments
and its block-table row. The step's positions, cache slots and attention metadata are computed inside
the graph from those inputs and the KV manager's block table, which is updated in place and so read
current at every replay. Requests are padded to the bucket with copies of the first one: a copy
writes the same keys and values to the same slots, and its logits are dropped. A graph computes the
logits of every row of a segment that reads any, and the step keeps the rows its plans read; deferred
rows' hidden states are left where ``TriModeModel.deferred_logits`` reads them, as after an eager step.

AR decodes are captured when the engine is built (their first step is then as fast as the rest), and
a serving engine captures the shapes a lone request comes to at the block lengths its router may choose
(``precapture``, ``block_shapes``) before it takes requests; any other shape is captured the first time
a step has it, from that step's inputs (the warm-up runs before the capture write the same keys and
values the replay then writes). ``MAX_GRAPHS`` and ``MAX_ROWS`` bound how many are kept and how large
one is; prefill chunks, images, mixed steps and requests past ``MAX_CONTEXT`` run eagerly.

Lossless by construction: a replay runs the same kernels as the eager step (the Triton backend, whose
results for a row do not depend on the other rows of the call, nor on which other rows' logits are
computed) on the same rows, so a request's logits are bit-identical to the eager step's and
self-speculation's verify rows still match AR's. Where no GPU is present (``capture=False``, the
tests) the same static step runs eagerly: what a GPU adds is only the capture and the replay.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

import kernels
from kernels.triton_segment_attention import graph_metadata, tile_layout
from models.batch import StepBatch, table_slots
from models.engine.kv_manager import KVCacheManager
from models.kv_cache import PagedKVCache
from models.modes import DecodeState, Plan
from models.segments import MaskKind, Segment

BUCKETS = (1, 2, 4, 8, 16, 32, 64)
MAX_CONTEXT = 8192  # keys a graphed row may see: every replay computes this many slots per segment
MAX_ROWS = 256  # query rows of a graphed step (requests x rows each): bounds the logits buffer
MAX_GRAPHS = 256  # graphs an engine keeps; a step of a shape found after that runs eagerly

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SegmentShape:
    """What a graph fixes about one segment; its tokens and first position are inputs."""

    rows: int
    kind: MaskKind
    write: bool  # every row's keys and values go to the cache (else none do)
    adapter: bool  # every row takes the draft adapter (else none does)
    reads: bool = True  # some rows' logits are read (the graph computes all of its rows')
    deferred: tuple[int, ...] = ()  # rows whose final hidden states are kept for deferred logits


StepShape = tuple[SegmentShape, ...]  # one request's segments, in order

AR_DECODE: StepShape = (SegmentShape(1, MaskKind.CAUSAL, write=True, adapter=False),)


def block_shapes(length: int) -> list[StepShape]:
    """The step shapes a lone request decoding with blocks of ``length`` comes to after its prefill, in
    every mode (models/modes): a draft (linear_spec, quadratic_spec's plain draft), a denoise pass
    (diffusion, infilling windows), a verify of each window (linear_spec; a whole block's is also
    diffusion's block commit) and quadratic_spec's cycle at each window with one branch (the default);
    a verify of one row is an AR token."""
    draft = SegmentShape(length, MaskKind.BIDIRECTIONAL, write=False, adapter=True)
    shapes: list[StepShape] = [(draft,), (SegmentShape(length, MaskKind.BIDIRECTIONAL, write=False, adapter=False),)]
    for window in range(1, length):
        verify = SegmentShape(window + 1, MaskKind.CAUSAL, write=True, adapter=False)
        branch = SegmentShape(
            length, MaskKind.BIDIRECTIONAL, False, True, reads=False, deferred=tuple(range(1, window + 1))
        )
        shapes += [(verify,), (verify, branch)]
    return shapes


def segment_shape(seg: Segment) -> SegmentShape | None:
    """The shape of ``seg`` when a graph can run it: consecutive positions right after its cached
    prefix, written and adapted all or nothing, no image rows; else None."""
    n, write, adapter = len(seg), seg.write[0], seg.adapter[0]
    if seg.input_embeds is not None or seg.write.count(write) != n or seg.adapter.count(adapter) != n:
        return None
    if seg.positions != list(range(seg.prefix_len, seg.prefix_len + n)):
        return None
    return SegmentShape(n, seg.kind, write, adapter, seg.logit_rows != [], tuple(seg.deferred_rows or ()))


def step_shape(plan: Plan) -> StepShape | None:
    """The shape of ``plan`` when a graph can run it (every segment can, and some logits are read), not
    a prefill chunk (whose length follows the prompt); else None."""
    if plan.prefill_stop is not None:
        return None
    shape = tuple(segment_shape(seg) for seg in plan.segments)
    if None in shape or not any(seg.reads for seg in shape):
        return None
    return shape


@dataclass
class _Graph:
    """One shape's static step for one bucket of requests: its inputs and the row indices it packs."""

    inputs: torch.Tensor  # [requests, rows + segments + 1]: tokens, each segment's first position, table row
    layout: tuple[torch.Tensor, int]  # the attention tiles' static part (kernels.triton_segment_attention)
    segment: torch.Tensor  # of each packed row: its segment's index among all (request-major) ...
    offset: torch.Tensor  # ... and its row in that segment
    write_rows: torch.Tensor
    adapter_rows: torch.Tensor
    logit_rows: torch.Tensor  # every row of the segments that read logits
    deferred_rows: torch.Tensor | None
    logit_drafts: list[int]  # positions among logit_rows, and among deferred_rows, of the rows that take
    deferred_drafts: list[int]  # the adapter (StepBatch's fields of those names)
    graph: torch.cuda.CUDAGraph | None = None
    rope: tuple | None = None  # the RoPE table the graph reads (held, so a larger one made later cannot free it)
    deferred: tuple | None = None  # the model's deferred state as a replay leaves it


class StepGraphs:
    """The step graphs of one engine (its model, cache pool and KV manager). ``capture`` (default: on a
    CUDA device) records them; without it the static steps run eagerly (the tests)."""

    def __init__(
        self, model, cache: PagedKVCache, kv: KVCacheManager, max_batch: int, *, capture: bool | None = None
    ) -> None:
        if kernels.backend(model.device) != "triton":
            raise ValueError("step graphs run the Triton kernels (on CUDA, or forced with TRISERVE_KERNELS=triton)")
        self.model, self.cache, self.kv = model, cache, kv
        self.table = kv.block_table  # updated in place, never replaced: the graphs read it at every replay
        self.width = min(self.table.shape[1], -(-MAX_CONTEXT // kv.page_size)) * kv.page_size
        attn = model.encoder.layers[0].self_attn
        self.group = attn.num_heads // attn.num_kv_heads
        self.cols = torch.arange(self.width, device=model.device)
        self.buckets = sorted({b for b in BUCKETS if b < max_batch} | {min(max_batch, BUCKETS[-1])})
        self.capture = capture if capture is not None else model.device.type == "cuda"
        self.graphs: dict[tuple[StepShape, int], _Graph] = {}
        self.out: torch.Tensor | None = None  # every graph's logits land here (outside the graphs' pool)
        self.pool = torch.cuda.graph_pool_handle() if self.capture else None
        for size in reversed(self.buckets):  # largest first: the smaller ones reuse its memory
            self._graph(AR_DECODE, size, None)

    def precapture(self, blocks: list[int]) -> int:
        """Capture ``block_shapes`` of each block length for one request now (from zero inputs, as the AR
        buckets); returns how many graphs the engine holds."""
        for length in blocks:
            for shape in block_shapes(length):
                self._graph(shape, 1, None)
        return len(self.graphs)

    def _forward(self, shape: StepShape, entry: _Graph) -> torch.Tensor:
        """The forward of a step from its static inputs only (what a graph records): the logits of every
        row of the segments that read any."""
        inputs, page = entry.inputs, self.kv.page_size
        total = sum(seg.rows for seg in shape)
        starts = inputs[:, total : total + len(shape)].reshape(-1)  # request-major, as the layout
        table_rows = inputs[:, -1].repeat_interleave(len(shape))
        positions = starts.index_select(0, entry.segment) + entry.offset
        rows_table = table_rows.index_select(0, entry.segment)
        prefix_slots = table_slots(self.table, table_rows[:, None], self.cols[None, :], page)
        batch = StepBatch(
            tokens=inputs[:, :total].reshape(-1),
            positions=positions,
            attention=graph_metadata(entry.layout, starts, prefix_slots, self.group),
            write_rows=entry.write_rows,
            write_slots=table_slots(
                self.table,
                rows_table.index_select(0, entry.write_rows),
                positions.index_select(0, entry.write_rows),
                page,
            ),
            adapter_rows=entry.adapter_rows,
            logit_rows=entry.logit_rows,
            position_limit=self.width + total,
            deferred_rows=entry.deferred_rows,
            logit_drafts=entry.logit_drafts,
            deferred_drafts=entry.deferred_drafts,
        )
        return self.model(batch, self.cache)

    def _graph(self, shape: StepShape, size: int, host: torch.Tensor | None) -> _Graph | None:
        """The graph of ``shape`` for ``size`` requests, captured now if it is new (from ``host``'s
        inputs, else zeros); None where the limits leave it to eager steps."""
        key = (shape, size)
        if key in self.graphs:
            return self.graphs[key]
        total = sum(seg.rows for seg in shape)
        if len(self.graphs) >= MAX_GRAPHS or size * total > MAX_ROWS:
            return None
        device = self.model.device
        # every packed row: (its segment's index among all, the segment's shape, its row in the segment)
        packed = [
            (request * len(shape) + s, seg, r)
            for request in range(size)
            for s, seg in enumerate(shape)
            for r in range(seg.rows)
        ]
        adapter = [i for i, (_, seg, _) in enumerate(packed) if seg.adapter]
        logit = [i for i, (_, seg, _) in enumerate(packed) if seg.reads]
        deferred = [i for i, (_, seg, r) in enumerate(packed) if r in seg.deferred]
        drafts = set(adapter)

        def tensor(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.long, device=device)

        entry = _Graph(
            inputs=torch.zeros((size, total + len(shape) + 1), dtype=torch.long, device=device),
            layout=tile_layout([(seg.rows, seg.kind) for seg in shape], size, self.width, self.group, device),
            segment=tensor([s for s, _, _ in packed]),
            offset=tensor([r for _, _, r in packed]),
            write_rows=tensor([i for i, (_, seg, _) in enumerate(packed) if seg.write]),
            adapter_rows=tensor(adapter),
            logit_rows=tensor(logit),
            deferred_rows=tensor(deferred) if deferred else None,
            logit_drafts=[k for k, i in enumerate(logit) if i in drafts],
            deferred_drafts=[k for k, i in enumerate(deferred) if i in drafts],
        )
        if host is not None:
            entry.inputs.copy_(host)
        if self.capture:
            try:
                self._record(shape, entry)
            except RuntimeError as error:  # its steps still run, through the same static forward, eagerly
                logger.warning("no CUDA graph of %d-request steps of shape %s: %s", size, shape, error)
                entry.graph = None
        self.graphs[key] = entry
        return entry

    def _record(self, shape: StepShape, entry: _Graph) -> None:
        """Capture ``entry``'s forward. It runs twice beforehand (on a side stream, as capture requires):
        kernels compile, fused or merged weights and the RoPE table are prepared outside the graph. With
        zero inputs those runs write the keys of token 0 at position 0 into the slot that block-table row 0
        maps position 0 to; with a step's own inputs, the keys and values that step writes anyway."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                logits = self._forward(shape, entry)
        torch.cuda.current_stream().wait_stream(side)
        if self.out is None:
            self.out = torch.empty((MAX_ROWS, logits.shape[1]), dtype=logits.dtype, device=logits.device)
        entry.rope = self.model.rotary._table
        entry.graph = torch.cuda.CUDAGraph()
        # thread_local: a capture in the middle of serving fails on this thread's stray calls only, not on
        # another thread's CUDA work (a replica's other threads keep running)
        with torch.cuda.graph(entry.graph, pool=self.pool, capture_error_mode="thread_local"):
            self.out[: logits.shape[0]].copy_(self._forward(shape, entry))
        entry.deferred = (self.model.deferred, self.model.deferred_drafts)

    def run(self, scheduled: list[tuple[int, Plan, DecodeState]]) -> torch.Tensor | None:
        """The logits of a step whose plans all have one ``step_shape`` and which fits a graph, the rows
        each plan reads in order (from the graphs' output buffer: read it before the next step); None
        otherwise."""
        if not scheduled:
            return None
        shape = step_shape(scheduled[0][1])
        count = len(scheduled)
        size = next((b for b in self.buckets if b >= count), None)
        if shape is None or size is None or any(step_shape(plan) != shape for _, plan, _ in scheduled[1:]):
            return None
        plans = [plan for _, plan, _ in scheduled]
        if max(seg.prefix_len for plan in plans for seg in plan.segments) + max(s.rows for s in shape) > self.width:
            return None
        if self.kv.block_table is not self.table:  # reading it writes the pages given out since the last step
            raise RuntimeError("the KV manager replaced its block table; the step graphs read the old one")
        inputs = [
            [t for seg in plan.segments for t in seg.tokens]
            + [seg.prefix_len for seg in plan.segments]
            + [self.kv.row(s)]
            for (s, _, _), plan in zip(scheduled, plans)
        ]
        host = torch.tensor(inputs + inputs[:1] * (size - count))
        entry = self._graph(shape, size, host)
        if entry is None:
            return None
        entry.inputs.copy_(host)
        if entry.graph is None:
            logits = self._forward(shape, entry)
        else:
            entry.graph.replay()
            logits = self.out[: entry.logit_rows.numel()]
            self.model.deferred, self.model.deferred_drafts = entry.deferred
        read, start = [], 0  # positions in the graph's logits of the rows each plan reads
        for plan in plans:
            for seg, seg_shape in zip(plan.segments, shape):
                if seg_shape.reads:
                    read += [start + r for r in seg.read_rows]
                    start += seg_shape.rows
        if read == list(range(len(read))):
            return logits[: len(read)]
        return logits.index_select(0, torch.tensor(read, device=logits.device))
