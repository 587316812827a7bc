"""The continuous-batching engine: batch-independent outputs, admission, chunked prefill, cancel."""

from __future__ import annotations

import random

import pytest

import models
from deployments.engine import Engine, RequestRejected
from models.modes import DecodeParams
from tests.conftest import random_model

MODES = ["ar", "diffusion", "linear_spec", "quadratic_spec"]


def _drain(engine: Engine) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for _ in range(10_000):
        if not engine.has_work:
            return out
        for o in engine.step():
            out.setdefault(o.request_id, []).extend(o.new_tokens)
    raise AssertionError("engine did not finish")


def test_sixteen_mixed_requests_equal_each_alone():
    model = random_model(seed=5)
    rng = random.Random(1)
    engine = Engine(model, num_pages=256, page_size=8, prefill_chunk=7)
    requests = {}
    for i in range(16):
        prompt = [1] + [rng.randrange(4, 64) for _ in range(rng.randrange(3, 40))]
        params = DecodeParams(mode=MODES[i % 4], max_new_tokens=rng.randrange(5, 30), block_length=rng.choice([4, 8]))
        requests[f"r{i}"] = (prompt, params)
        engine.add_request(f"r{i}", prompt, params)
    got = _drain(engine)
    for rid, (prompt, p) in requests.items():
        alone = models.generate(
            model, prompt, mode=p.mode, max_new_tokens=p.max_new_tokens, block_length=p.block_length
        )
        assert got[rid] == alone.tokens, rid
    assert engine.cache.used_pages == 0 and engine.stats.running == 0


def test_requests_join_and_leave_between_steps():
    model = random_model(seed=6)
    engine = Engine(model, num_pages=64, page_size=8)
    engine.add_request("a", [1, 5, 6, 7], DecodeParams(mode="ar", max_new_tokens=12))
    early = [t for _ in range(2) for o in engine.step() for t in o.new_tokens]
    engine.add_request("b", [1, 9, 9], DecodeParams(mode="linear_spec", max_new_tokens=6, block_length=4))
    got = _drain(engine)
    got["a"] = early + got["a"]
    assert got["a"] == models.generate(model, [1, 5, 6, 7], max_new_tokens=12).tokens
    assert got["b"] == models.generate(model, [1, 9, 9], mode="linear_spec", max_new_tokens=6, block_length=4).tokens


def test_admission_waits_when_pool_is_committed_and_rejects_what_never_fits():
    model = random_model(seed=7, eos_token_id=None)  # no EOS: requests run to max_tokens
    engine = Engine(model, num_pages=8, page_size=8)  # 64 tokens of KV in all
    with pytest.raises(RequestRejected, match="pool holds 64"):
        engine.add_request("huge", [1] * 40, DecodeParams(mode="ar", max_new_tokens=40))
    engine.add_request("a", [1] * 20, DecodeParams(mode="ar", max_new_tokens=20))  # 41 tokens: 6 pages
    engine.add_request("b", [1] * 10, DecodeParams(mode="ar", max_new_tokens=10))  # 21 tokens: 3 pages
    engine.step()
    assert engine.stats.running == 1 and engine.stats.waiting == 1  # b waits for a's pages
    _drain(engine)
    assert engine.stats.running == engine.stats.waiting == 0 and engine.cache.used_pages == 0


def test_long_prompt_is_prefilled_in_chunks_while_others_decode():
    model = random_model(seed=8)
    engine = Engine(model, num_pages=128, page_size=8, prefill_chunk=16)
    engine.add_request("short", [1, 4, 5], DecodeParams(mode="ar", max_new_tokens=30))
    engine.step()
    engine.add_request("long", [1] + [7] * 150, DecodeParams(mode="ar", max_new_tokens=4))
    progressed = 0
    for _ in range(6):  # the long prompt needs ten chunks; the short request keeps decoding
        progressed += sum(len(o.new_tokens) for o in engine.step() if o.request_id == "short")
    assert progressed == 6
    assert engine.running["long"].state.prefilling


def test_cancel_frees_pages_at_once():
    model = random_model(seed=9)
    engine = Engine(model, num_pages=32, page_size=8)
    engine.add_request("x", [1] * 30, DecodeParams(mode="diffusion", max_new_tokens=40, block_length=8))
    engine.step()
    engine.step()
    assert engine.cache.used_pages > 0
    assert engine.cancel("x")
    assert engine.cache.used_pages == 0 and not engine.has_work
    assert not engine.cancel("x")


def test_stats_report_ttft_nfe_tpf():
    model = random_model(seed=10)
    engine = Engine(model, num_pages=32, page_size=8)
    engine.add_request("s", [1, 4, 8], DecodeParams(mode="linear_spec", max_new_tokens=10, block_length=4))
    last = None
    while engine.has_work:
        for o in engine.step():
            last = o
    assert last.finished and last.tokens == 10 and last.nfe >= 1 and last.ttft is not None
    assert last.tpf == pytest.approx(10 / last.nfe) and sum(last.accepted_lengths) >= 9
    assert "linear_spec" in engine.stats.step_time_ema and engine.stats.tpf_ema["linear_spec"] > 0
