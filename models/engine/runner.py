"""The model runner: one step's plans -> one packed forward -> every request's results.

It packs the segments of all scheduled requests (``models.batch.pack``: slot mappings from the
KV manager's device block table, attention metadata built once for all layers), runs the
forward, and hands the logits to the sampler, which returns each request's integers after a
single device-to-host copy. A step whose requests all plan segments of one shape may replay a CUDA graph of
the forward instead (``models.engine.step_graphs``).
"""

from __future__ import annotations

from models.batch import pack
from models.engine.kv_manager import KVCacheManager
from models.engine.sampler import Item, Sampler
from models.engine.step_graphs import StepGraphs
from models.kv_cache import PagedKVCache
from models.modes import DecodeState, Plan


class ModelRunner:
    def __init__(self, model, cache: PagedKVCache, kv: KVCacheManager, graphs: StepGraphs | None = None) -> None:
        self.model = model
        self.cache = cache
        self.kv = kv
        self.graphs = graphs  # steps of one shape replay these (None: every step runs eagerly)
        self.sampler = Sampler(model, model.config.mask_token_id)

    def execute(self, scheduled: list[tuple[int, Plan, DecodeState]]) -> list[list[int]]:
        """Run one step for ``(sequence id, plan, state)`` triples; return each one's result integers."""
        logits = self.graphs.run(scheduled) if self.graphs is not None else None
        if logits is None:
            items = [(seq_id, seg) for seq_id, plan, _ in scheduled for seg in plan.segments]
            batch = pack(items, self.kv, self.model.device)
            logits = self.model(batch, self.cache)  # stays on the device: the sampler reduces it there
        work: list[Item] = []
        row = deferred = 0
        for _, plan, state in scheduled:
            if plan.work is not None:
                work.append(Item(state, plan.work, row, deferred))
            for seg in plan.segments:
                row += len(seg.read_rows)
                deferred += len(seg.deferred_rows or ())
        results = iter(self.sampler.run(logits, work))
        return [next(results) if plan.work is not None else [] for _, plan, _ in scheduled]
