"""Packed segments: masks, and one forward over many requests equals each request alone, bit for bit."""

from __future__ import annotations

import torch

from models.batch import pack
from models.engine import KVCacheManager
from models.engine.sampler import Item, Sampler
from models.modes import DecodeParams, make_state
from models.segments import MaskKind, segment_mask
from tests.conftest import random_model


def test_causal_and_bidirectional_masks():
    causal = segment_mask(MaskKind.CAUSAL, 3, 2)
    assert causal.tolist() == [
        [True, True, True, False, False],
        [True, True, True, True, False],
        [True, True, True, True, True],
    ]
    assert segment_mask(MaskKind.BIDIRECTIONAL, 3, 2).all()


def _step(model, cache, kv, items):
    """One forward over ``(seq_id, state, plan)``: each request's logits and its sampler result."""
    for seq_id, _, plan in items:
        kv.reserve(seq_id, max(plan.write_extent, kv.length(seq_id)))
    batch = pack([(seq_id, seg) for seq_id, _, plan in items for seg in plan.segments], kv)
    logits = model(batch, cache)
    per_plan = [
        (sum(len(seg.read_rows) for seg in plan.segments), sum(len(seg.deferred_rows or ()) for seg in plan.segments))
        for _, _, plan in items
    ]
    pieces = torch.split(logits, [rows for rows, _ in per_plan])
    works, row, deferred = [], 0, 0
    for (_, state, plan), (rows, count) in zip(items, per_plan):
        works.append(Item(state, plan.work, row, deferred))
        row, deferred = row + rows, deferred + count
    live = [w for w in works if w.work is not None]
    results = iter(Sampler(model, model.config.mask_token_id).run(logits, live))
    return list(pieces), [next(results) if w.work is not None else [] for w in works]


def test_packed_forward_equals_each_request_alone():
    model = random_model(seed=11)
    modes = ["ar", "diffusion", "linear_spec", "quadratic_spec", "ar", "linear_spec"]
    prompts = [[1] + [4 + (7 * i + 3 * j) % 50 for j in range(5 + 3 * i)] for i in range(len(modes))]
    params = [DecodeParams(mode=m, max_new_tokens=20, block_length=4 + 2 * (i % 2)) for i, m in enumerate(modes)]
    together = [make_state(p, prm, model.config) for p, prm in zip(prompts, params)]
    alone = [make_state(p, prm, model.config) for p, prm in zip(prompts, params)]
    shared_cache = model.new_cache(num_pages=128, page_size=8)
    shared = KVCacheManager(128, 8, prefix_caching=False)
    own = [(model.new_cache(num_pages=32, page_size=8), KVCacheManager(32, 8, max_seqs=1)) for _ in modes]
    for i, (_, kv) in enumerate(own):
        kv.add(i)
        shared.add(i)
    steps = 0
    while not all(s.finished for s in together):
        live = [i for i, s in enumerate(together) if not s.finished]
        plans = {i: together[i].plan(10**6) for i in live}
        packed, results = _step(model, shared_cache, shared, [(i, together[i], plans[i]) for i in live])
        for i, mine, result in zip(live, packed, results):
            plan = alone[i].plan(10**6)
            (single,), (single_result,) = _step(model, *own[i], [(i, alone[i], plan)])
            assert torch.equal(mine, single), (i, modes[i])
            together[i].advance(plans[i], result)
            alone[i].advance(plan, single_result)
            shared.set_length(i, together[i].cached_len)
            own[i][1].set_length(i, alone[i].cached_len)
            assert together[i].tokens == alone[i].tokens
        steps += 1
    assert steps > 5
