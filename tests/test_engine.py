"""The continuous-batching engine: real packing, batch-independent outputs, on-demand pages with
preemption, prefix caching, a scheduler that cannot starve, tiers, chunked prefill, cancel."""

from __future__ import annotations

import gc
import random
import weakref

import pytest

import models
from models.engine import Engine, RequestRejected
from models.modes import DecodeParams
from tests.conftest import random_model

MODES = ["ar", "diffusion", "linear_spec", "quadratic_spec"]


def _drain(engine: Engine, limit: int = 10_000) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for _ in range(limit):
        if not engine.has_work:
            return out
        for o in engine.step():
            out.setdefault(o.request_id, []).extend(o.new_tokens)
    raise AssertionError("engine did not finish")


def _alone(model, prompt, p: DecodeParams) -> models.Generation:
    return models.generate(
        model,
        prompt,
        mode=p.mode,
        max_new_tokens=p.max_new_tokens,
        block_length=p.block_length,
        temperature=p.temperature,
        seed=p.seed,
    )


def test_sixteen_mixed_requests_equal_each_alone():
    model = random_model(seed=5)
    rng = random.Random(1)
    engine = Engine(model, num_pages=256, page_size=8, prefill_chunk=7, max_step_tokens=64)
    requests = {}
    for i in range(16):
        prompt = [1] + [rng.randrange(4, 64) for _ in range(rng.randrange(3, 40))]
        params = DecodeParams(mode=MODES[i % 4], max_new_tokens=rng.randrange(5, 30), block_length=rng.choice([4, 8]))
        requests[f"r{i}"] = (prompt, params)
        engine.add_request(f"r{i}", prompt, params)
    got = _drain(engine)
    for rid, (prompt, p) in requests.items():
        assert got[rid] == _alone(model, prompt, p).tokens, rid
    assert engine.kv.used_pages == 0 and engine.stats.running == 0


def test_seeded_sampling_is_independent_of_neighbours():
    model = random_model(seed=12)
    engine = Engine(model, num_pages=128, page_size=8)
    requests = {}
    for i, mode in enumerate(MODES * 2):
        params = DecodeParams(mode=mode, max_new_tokens=12, block_length=4, temperature=0.8 + 0.1 * i, seed=100 + i)
        requests[f"s{i}"] = ([1, 5 + i, 9, 17], params)
        engine.add_request(f"s{i}", *requests[f"s{i}"])
    got = _drain(engine)
    for rid, (prompt, p) in requests.items():
        assert got[rid] == _alone(model, prompt, p).tokens, rid


def test_a_step_packs_many_requests():
    """N identical-length AR requests finish in as many steps as one (each step runs all of them)."""
    model = random_model(seed=13, eos_token_id=None)
    steps = {}
    for n in (1, 12):
        engine = Engine(model, num_pages=256, page_size=8)
        for i in range(n):
            engine.add_request(f"r{i}", [1, 4 + i, 9, 11], DecodeParams(mode="ar", max_new_tokens=20))
        _drain(engine)
        steps[n] = engine.stats.steps
    assert steps[12] == steps[1] == 20  # one prefill step (it gives the first token), then 19 decode steps


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


def test_pages_are_taken_on_demand_and_what_never_fits_is_rejected():
    model = random_model(seed=7, eos_token_id=None)  # no EOS: requests run to max_tokens
    engine = Engine(model, num_pages=8, page_size=8)  # 64 tokens of KV in all
    with pytest.raises(RequestRejected, match="pool holds 64"):
        engine.add_request("huge", [1] * 40, DecodeParams(mode="ar", max_new_tokens=40))
    engine.add_request("a", [1] * 20, DecodeParams(mode="ar", max_new_tokens=20))  # worst case 41 tokens
    engine.add_request("b", [2] * 10, DecodeParams(mode="ar", max_new_tokens=10))  # worst case 21 tokens
    engine.step()
    # both run at once: a worst-case reservation (6 + 3 pages) would not fit in 8, their prompts do
    assert engine.stats.running == 2 and engine.kv.used_pages == 3 + 2
    _drain(engine)
    assert engine.stats.running == engine.stats.waiting == 0 and engine.kv.used_pages == 0


def test_requests_with_one_prompt_share_its_prefill():
    """n choices of one prompt: the first computes the prompt, the others wait for its pages and take
    them from the prefix cache (each computes only the prompt's last token, for its own first draw)."""
    model = random_model(seed=7)
    engine = Engine(model, num_pages=64, page_size=8)
    prompt = list(range(1, 42))
    for i in range(3):
        engine.add_request(str(i), prompt, DecodeParams(mode="ar", max_new_tokens=4, temperature=1.0, seed=i))
    engine.step()
    assert engine.stats.running == 1 and engine.stats.batch_tokens == len(prompt)
    engine.step()  # the others start from the cached 5 pages: one token each, beside the first's decode
    assert engine.stats.running == 3 and engine.stats.batch_tokens == 1 + 2 * 1
    assert engine.stats.prefix_hits == 2 * 40
    _drain(engine)


@pytest.mark.parametrize("mode", MODES)
def test_preempted_requests_resume_with_the_same_tokens(mode):
    """A pool far too small for everyone: requests are preempted, recompute and emit what they would have."""
    model = random_model(seed=14, eos_token_id=None)
    rng = random.Random(2)
    engine = Engine(model, num_pages=12, page_size=4, prefix_caching=False)
    requests = {}
    for i in range(6):
        prompt = [1] + [rng.randrange(4, 64) for _ in range(rng.randrange(4, 12))]
        params = DecodeParams(mode=mode, max_new_tokens=16, block_length=4, temperature=0.7 * (i % 2), seed=i)
        requests[f"p{i}"] = (prompt, params)
        engine.add_request(f"p{i}", prompt, params)
    got = _drain(engine)
    assert engine.stats.preemptions > 0
    for rid, (prompt, p) in requests.items():
        assert got[rid] == _alone(model, prompt, p).tokens, rid
    assert engine.kv.used_pages == 0


def test_preempted_request_keeps_its_forward_count():
    model = random_model(seed=15, eos_token_id=None)
    engine = Engine(model, num_pages=6, page_size=4, prefix_caching=False)
    outs = {}
    for i in range(3):
        engine.add_request(
            f"q{i}", [1, 6 + i, 7, 9, 10], DecodeParams(mode="linear_spec", max_new_tokens=12, block_length=4)
        )
    while engine.has_work:
        for o in engine.step():
            outs[o.request_id] = o
    assert engine.stats.preemptions > 0
    alone = models.generate(model, [1, 6, 7, 9, 10], mode="linear_spec", max_new_tokens=12, block_length=4)
    assert outs["q0"].nfe == alone.nfe  # recomputing a dropped cache is not a decoding forward


def test_prefix_cache_hit_gives_the_same_tokens_and_skips_the_cached_prefill():
    model = random_model(seed=16)
    shared = [1] + [4 + (i * 7) % 55 for i in range(40)]
    engine = Engine(model, num_pages=64, page_size=8)
    engine.add_request("first", shared + [20], DecodeParams(mode="ar", max_new_tokens=6))
    first = _drain(engine)["first"]
    prefill_tokens = []
    engine.add_request("second", shared + [21, 22], DecodeParams(mode="linear_spec", max_new_tokens=6, block_length=4))
    second = []
    while engine.has_work:
        outs = engine.step()
        prefill_tokens.append(engine.stats.batch_tokens)
        second += [t for o in outs for t in o.new_tokens]
    assert engine.stats.prefix_hits == 40  # five full pages of the shared prefix
    assert prefill_tokens[0] == len(shared) + 2 - 40  # only the tail was computed
    assert first == models.generate(model, shared + [20], max_new_tokens=6).tokens
    assert (
        second == models.generate(model, shared + [21, 22], mode="linear_spec", max_new_tokens=6, block_length=4).tokens
    )


def test_a_prompt_fully_in_the_cache_still_computes_its_last_token():
    model = random_model(seed=17)
    prompt = [1] + [5 + i for i in range(15)]  # exactly two pages of 8
    engine = Engine(model, num_pages=32, page_size=8)
    for name in ("a", "b"):
        engine.add_request(name, prompt, DecodeParams(mode="ar", max_new_tokens=5))
        assert _drain(engine)[name] == models.generate(model, prompt, max_new_tokens=5).tokens
    assert engine.stats.prefix_hits == 8  # the page with the last prompt token is recomputed


def test_long_quadratic_request_does_not_starve_a_new_short_one():
    model = random_model(seed=18, eos_token_id=None)
    engine = Engine(model, num_pages=128, page_size=8, max_step_tokens=32)
    engine.add_request("long", [1, 4, 5], DecodeParams(mode="quadratic_spec", max_new_tokens=200, block_length=16))
    for _ in range(3):
        engine.step()  # its cycles (up to 16 x 17 query tokens) are far over the budget
    engine.add_request("short", [1, 8, 9], DecodeParams(mode="ar", max_new_tokens=3))
    first_step = engine.step()  # its prefill goes first with the whole budget: its first token at once
    assert any(o.request_id == "short" and o.new_tokens for o in first_step)
    long_progress = sum(len(o.new_tokens) for _ in range(4) for o in engine.step() if o.request_id == "long")
    assert long_progress > 0  # and the long one keeps going


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


def test_tiers_order_admission_and_ageing_lets_batch_through():
    model = random_model(seed=19, eos_token_id=None)
    now = [0.0]
    engine = Engine(model, num_pages=64, page_size=8, max_running=1, priority_ageing_s=10.0)
    engine.scheduler.clock = lambda: now[0]

    def submit(name: str, tier: str, at: float) -> None:
        request = engine.prepare(name, [1, 3, 4], DecodeParams(mode="ar", max_new_tokens=2), tier=tier)
        request.stats.arrival = at
        engine.submit(request)

    submit("batch", "batch", 0.0)
    submit("standard", "standard", 0.5)
    submit("interactive", "interactive", 1.0)
    order = []
    while engine.has_work:
        order += [o.request_id for o in engine.step() if o.finished]
    assert order == ["interactive", "standard", "batch"]
    now[0] = 100.0  # a batch request that has waited long enough goes before a fresh interactive one
    submit("old-batch", "batch", 70.0)
    submit("new-interactive", "interactive", 99.0)
    order = []
    while engine.has_work:
        order += [o.request_id for o in engine.step() if o.finished]
    assert order == ["old-batch", "new-interactive"]


def test_cancel_frees_pages_at_once():
    model = random_model(seed=9)
    engine = Engine(model, num_pages=32, page_size=8)
    engine.add_request("x", [1] * 30, DecodeParams(mode="diffusion", max_new_tokens=40, block_length=8))
    engine.step()
    engine.step()
    assert engine.kv.used_pages > 0
    assert engine.cancel("x")
    assert engine.kv.used_pages == 0 and not engine.has_work
    assert not engine.cancel("x")


def test_stats_report_ttft_nfe_tpf():
    model = random_model(seed=10)
    engine = Engine(model, num_pages=32, page_size=8)
    engine.add_request("s", [1, 4, 8], DecodeParams(mode="linear_spec", max_new_tokens=10, block_length=4))
    last, cycles = None, []
    while engine.has_work:
        for o in engine.step():
            last = o
            cycles += o.new_accepted
    assert last.finished and last.tokens == 10 and last.nfe >= 1 and last.ttft is not None
    assert last.tpf == pytest.approx(10 / last.nfe) and sum(cycles) >= 9
    figures = engine.stats.options.options["linear_spec@4"]  # a lone request: every decode step counts
    assert figures.tpf == pytest.approx(last.tpf) and figures.step_s > 0 and figures.samples > 1


def test_an_engine_is_freed_as_soon_as_it_is_dropped():
    """No reference cycle keeps a dropped engine (and its KV cache) alive until the garbage collector
    runs: a tensor-parallel group's ranks free their caches only when rank 0's is freed."""
    engine = Engine(random_model(), num_pages=8)
    engine.add_request("r", [1, 5, 9], DecodeParams(mode="linear_spec", max_new_tokens=4, block_length=4))
    _drain(engine)
    gc.disable()
    try:
        ref = weakref.ref(engine)
        del engine
        assert ref() is None
    finally:
        gc.enable()
