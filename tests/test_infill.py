"""Infilling, revision and the decoding trace in the Ray-free core (the HTTP side is in
test_serve_http.py): an infill window equals a dense computation of the same attention, the kept
middle is the best rated candidate, revision stays within its pass bound and is seeded, and the
trace of every mode adds up to what the request emitted."""

from __future__ import annotations

import pytest
import torch

import models
from kernels.row_stats import unmask_reference
from models.engine import Engine, RequestRejected
from models.engine.sampler import Item, Sampler
from models.infill import MIDDLE_WEIGHT, infill, middle_lengths, scored_text
from models.modes import DecodeParams, Unmask, make_state
from models.modes.infill import visible_suffix
from models.training import draw_noise
from tests.conftest import random_model, tiny_config

PREFIX = "def area(width, height):\n    "
SUFFIX = "\n    return result\n\n\ndef perimeter(width, height):\n    return 2 * (width + height)\n"


def ids(fixture_model, prefix=PREFIX, suffix=SUFFIX):
    tok = fixture_model.tokenizer
    return tok.encode(prefix), tok.encode(suffix, add_special_tokens=False)


@torch.inference_mode()
def dense_window(model, prefix: list[int], suffix: list[int], middle: int, block: int) -> list[int]:
    """The middle as a plain dense computation: ``[prefix | middle masks | suffix head]`` in one
    forward per pass, the prefix causal, the window seeing the prefix and all of itself; each pass
    commits the confident masked slots as diffusion does (threshold 0.9, at least one). The head fills
    the block, and is a quarter block at least."""
    head = suffix[: max(block - middle, block // 4)]
    window = [model.config.mask_token_id] * middle + head
    n, total = len(prefix), len(prefix) + len(window)
    mask = torch.ones(total, total, dtype=torch.bool).tril()
    mask[n:, n:] = True
    while model.config.mask_token_id in window[:middle]:
        logits = model.forward_dense(torch.tensor([prefix + window]), torch.arange(total), mask)[0, n:]
        blocks = torch.tensor([window])
        unmask_reference(blocks, logits[None].float(), model.config.mask_token_id, 0.9)
        window = blocks[0].tolist()
    return window[:middle]


def run(model, params: DecodeParams, prompt: list[int]):
    """Decode one request; its trace events (which the engine hands out with each step's outputs)
    are put back on the state."""
    engine = Engine(model, num_pages=32)
    state = engine.add_request("r", prompt, params).state
    events = []
    while engine.has_work:
        events += [e for out in engine.step() for e in out.trace]
    state.trace = events
    return state


@pytest.mark.parametrize("middle", [3, 7])
def test_an_infill_window_equals_a_dense_computation(fixture_model, middle):
    prefix, suffix = ids(fixture_model)
    result = infill(fixture_model, prefix, suffix, lengths=[middle], block_length=8)
    expected = dense_window(fixture_model, prefix, suffix, middle, 8)
    eos = fixture_model.config.eos_token_id
    assert result.tokens == (expected[: expected.index(eos)] if eos in expected else expected)


def test_infill_keeps_the_best_rated_middle(fixture_model):
    prefix, suffix = ids(fixture_model)
    result = infill(fixture_model, prefix, suffix, 5)
    assert [c.length for c in result.candidates] == [1, 2, 3, 4, 5]
    for c in result.candidates:
        assert len(c.tokens) <= c.length and c.nfe >= 1
        logprobs = models.score(fixture_model, scored_text(prefix, c.tokens, suffix, fixture_model.config.block_size))
        first = len(prefix) + len(c.tokens)  # logprobs[i] is the id at i + 1
        assert c.logprob == pytest.approx(sum(logprobs[first - 1 :]), abs=1e-4)
        assert c.fluency == pytest.approx(sum(logprobs[len(prefix) - 1 : first]) / (len(c.tokens) + 1), abs=1e-5)
    best = max(result.candidates, key=lambda c: c.logprob + MIDDLE_WEIGHT * c.fluency)
    assert result.tokens == best.tokens and result.nfe == sum(c.nfe for c in result.candidates)


def test_a_middle_longer_than_a_block_sees_the_suffix_in_its_last_window(fixture_model):
    prefix, suffix = ids(fixture_model)
    params = DecodeParams(mode="diffusion", max_new_tokens=11, block_length=8, suffix=tuple(suffix), trace=True)
    state = run(fixture_model, params, prefix)
    windows = [e for e in state.trace if e["kind"] == "denoise"]
    assert windows[0]["output_slots"] == 8 and len(windows[0]["block"]) == 8  # a plain block first
    last = windows[-1]
    assert last["start"] == 8 and last["output_slots"] == 3  # then 3 masked slots before the suffix head
    assert last["block"][3:] == suffix[: visible_suffix(8, 3, len(suffix))]
    assert len(state.tokens) == 11 or state.finish_reason == "stop"


def test_middle_lengths_are_exact_then_a_grid():
    assert middle_lengths(4) == [1, 2, 3, 4]
    grid = middle_lengths(64)
    assert grid[:16] == list(range(1, 17)) and grid[-1] == 64 and grid == sorted(set(grid))
    with pytest.raises(ValueError):
        middle_lengths(0)


def test_infill_beyond_the_context_is_rejected():
    model = random_model(seed=1, max_position_embeddings=64)
    engine = Engine(model, num_pages=16)
    params = DecodeParams(mode="diffusion", max_new_tokens=20, block_length=8, suffix=tuple(range(4, 40)))
    with pytest.raises(RequestRejected, match="suffix tokens it sees"):
        engine.add_request("r", list(range(4, 46)), params)  # 42 + 20 fit in 64, with the 4-token head they do not
    engine.add_request("r", list(range(4, 44)), params)  # 40 + 20 + 4 do
    with pytest.raises(ValueError, match="needs mode diffusion"):
        DecodeParams(mode="linear_spec", suffix=(5,)).validate()


def test_revision_stays_within_its_pass_bound(fixture_model):
    prompt, _ = ids(fixture_model)
    plain = run(fixture_model, DecodeParams(mode="diffusion", max_new_tokens=16, block_length=8, trace=True), prompt)
    for passes in (0, 2):
        params = DecodeParams(
            mode="diffusion", max_new_tokens=16, block_length=8, revise=0.999, revise_passes=passes, trace=True
        )
        state = run(fixture_model, params, prompt)
        remasking = [e["start"] for e in state.trace if e.get("remasked")]  # by the block's place in the output
        assert all(remasking.count(start) <= passes for start in remasking)
        if passes:
            assert remasking  # at 0.999 nearly every checked token is re-masked
        else:
            assert state.tokens == plain.tokens and state.nfe == plain.nfe


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_a_denoise_pass_reads_its_masked_slots_rows_then_the_shadows(temperature):
    """A pass's logit rows are its masked slots only, in order, then one shadow row per checked slot."""
    config = tiny_config()
    mask = config.mask_token_id
    params = DecodeParams(mode="diffusion", max_new_tokens=8, block_length=4, temperature=temperature, seed=3)
    state = make_state([1, 2, 3], params, config)
    work = Unmask([5, mask, 7, mask], threshold=0.9, least=None, revise=0.5, revisable=[0, 2])
    logits = torch.zeros((4, config.vocab_size))
    logits[0, 11] = 60.0  # slot 1: token 11, certain
    logits[1, 12] = 1.0  # slot 3: unsure, not committed
    logits[2, 5] = 60.0  # shadow of slot 0: token 5 kept
    logits[3, 7] = -60.0  # shadow of slot 2: token 7 improbable, masked again
    (result,) = Sampler(None, mask).run(logits, [Item(state, work, row=0)])
    assert result == [5, 11, mask, mask]


def test_revision_is_deterministic_under_a_seed(fixture_model):
    prompt, _ = ids(fixture_model)
    params = DecodeParams(
        mode="diffusion", max_new_tokens=12, block_length=8, revise=0.5, temperature=0.8, seed=7, trace=True
    )
    first, second = run(fixture_model, params, prompt), run(fixture_model, params, prompt)
    assert first.tokens == second.tokens and first.trace == second.trace


@pytest.mark.parametrize("mode", ["ar", "diffusion", "linear_spec", "quadratic_spec"])
def test_the_trace_adds_up_to_the_output(fixture_model, mode):
    prompt, _ = ids(fixture_model)
    state = run(fixture_model, DecodeParams(mode=mode, max_new_tokens=12, block_length=4, trace=True), prompt)
    assert [t for e in state.trace for t in e["emitted"]] == state.tokens
    for event in state.trace:
        if event["kind"] == "denoise":
            assert all(event["block"][i] is not None for i in event["committed"])
        if event["kind"] == "verify":
            assert 0 <= event["accepted"] <= len(event["draft"])
    kinds = {e["kind"] for e in state.trace}
    assert {"ar": {"ar"}, "diffusion": {"denoise", "commit"}, "linear_spec": {"draft", "verify"}}.get(
        mode, {"verify"}
    ) <= kinds


def test_infill_masking_in_training():
    batch = torch.zeros(64, 64, dtype=torch.long)
    noise = draw_noise(batch, torch.Generator().manual_seed(0), block_size=16, infill_fraction=0.5)
    spans = 0
    for row, p in zip(noise.masked, noise.p):
        blocks = row.view(4, 16)
        r = int(blocks[0].sum())
        leading = torch.arange(16) < r
        if 1 <= r < 16 and all(torch.equal(b, leading) for b in blocks) and p == pytest.approx(r / 16):
            spans += 1
    assert 16 <= spans <= 48  # about half the rows, each a leading span of the same length in every block
