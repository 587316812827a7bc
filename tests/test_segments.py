"""Packed segments: masks, and one forward over many requests equals each request alone."""

from __future__ import annotations

import torch

from models.batch import pack
from models.modes import DecodeParams, make_state
from models.runner import write_extent
from models.segments import MaskKind, quadratic_layout, segment_mask
from tests.conftest import random_model


def test_causal_and_bidirectional_masks():
    causal = segment_mask(MaskKind.CAUSAL, 3, 2)
    assert causal.tolist() == [
        [True, True, True, False, False],
        [True, True, True, True, False],
        [True, True, True, True, True],
    ]
    assert segment_mask(MaskKind.BIDIRECTIONAL, 3, 2).all()


def test_quadratic_mask_structure():
    length, k, prefix = 3, 2, 1
    offsets, is_verify = quadratic_layout(k, length)
    assert offsets == [0, 1, 2, 3, 1, 2, 3, 4]
    assert is_verify == [True, False, False, False, True, False, False, False]
    mask = segment_mask(MaskKind.QUADRATIC, len(offsets), prefix, sub_block=length)
    assert mask[:, 0].all()  # the cached prefix is visible to every query
    own = mask[:, prefix:]
    d0, d1 = 0, 4
    assert own[d0].tolist() == [True] + [False] * 7  # d_0 sees itself only
    assert own[d1].tolist() == [True, False, False, False, True, False, False, False]  # d_1: d_0, d_1
    for row in (1, 2, 3):  # masks of sub-block 0: d_0 and their own sub-block
        assert own[row].tolist() == [True, True, True, True, False, False, False, False]
    for row in (5, 6, 7):  # masks of sub-block 1: d_0, d_1 and their own sub-block
        assert own[row].tolist() == [True, False, False, False, True, True, True, True]


def _step_logits(model, cache, items):
    for seq_id, segments in items:
        cache.reserve(seq_id, max(write_extent(segments), cache.length(seq_id)))
    flat = [(seq_id, seg) for seq_id, segments in items for seg in segments]
    batch = pack(flat, cache)
    logits = model(batch, cache)
    return list(torch.split(logits, batch.logit_counts))


def test_packed_forward_equals_each_request_alone():
    model = random_model(seed=11)
    modes = ["ar", "diffusion", "linear_spec", "quadratic_spec", "ar", "linear_spec"]
    prompts = [[1] + [4 + (7 * i + 3 * j) % 50 for j in range(5 + 3 * i)] for i in range(len(modes))]
    params = [DecodeParams(mode=m, max_new_tokens=20, block_length=4 + 2 * (i % 2)) for i, m in enumerate(modes)]
    together = [make_state(p, prm, model.config) for p, prm in zip(prompts, params)]
    alone = [make_state(p, prm, model.config) for p, prm in zip(prompts, params)]
    shared = model.new_cache(num_pages=128, page_size=8)
    own = [model.new_cache(num_pages=32, page_size=8) for _ in modes]
    for i, cache in enumerate(own):
        cache.add(i)
        shared.add(i)
    steps = 0
    while not all(s.finished for s in together):
        live = [i for i, s in enumerate(together) if not s.finished]
        plans = {i: together[i].plan() for i in live}
        packed = _step_logits(model, shared, [(i, plans[i]) for i in live])
        pieces = iter(packed)
        for i in live:
            mine = [next(pieces) for _ in plans[i]]
            single = _step_logits(model, own[i], [(i, alone[i].plan())])
            for a, b in zip(mine, single):
                assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)
            together[i].advance(mine)
            alone[i].advance(single)
            shared.set_length(i, together[i].cached_len)
            own[i].set_length(i, alone[i].cached_len)
            assert together[i].tokens == alone[i].tokens
        steps += 1
    assert steps > 5
