"""Sampling controls (models/controls.py) in every mode, in-process: each does what it says, the
speculative modes keep AR's tokens under all of them at temperature 0 and AR's distribution under
top_k / top_p at temperature 1, and logprobs come from the distribution each token was chosen from."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

import models
from models.controls import RowsOf, SamplingControls, shape_logits, truncate
from tests.conftest import random_model
from tests.test_distribution import PROMPT, SAMPLES, _next_token_probs, chi_square_p_value

MODES = ("ar", "diffusion", "linear_spec", "quadratic_spec")
SPEC = ("linear_spec", "quadratic_spec")


@pytest.fixture(scope="module")
def prompts(fixture_model, golden_records) -> list[list[int]]:
    return [r["prompt_ids"] for r in golden_records[:3]]


def _generate(model, prompt, mode, **kwargs):
    kwargs.setdefault("max_new_tokens", 24)
    kwargs.setdefault("block_length", 8)
    return models.generate(model, prompt, mode=mode, **kwargs)


# ----- each control's effect ---------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_top_k_one_is_greedy(fixture_model, prompts, mode):
    controls = SamplingControls(top_k=1)
    for prompt in prompts[:2]:
        greedy = _generate(fixture_model, prompt, mode).tokens
        sampled = _generate(fixture_model, prompt, mode, temperature=1.0, seed=5, controls=controls).tokens
        assert sampled == greedy


@pytest.mark.parametrize("mode", MODES)
def test_logit_bias_of_minus_100_removes_a_token(fixture_model, prompts, mode):
    for prompt in prompts[:2]:
        plain = _generate(fixture_model, prompt, mode).tokens
        banned = Counter(plain).most_common(1)[0][0]
        biased = _generate(fixture_model, prompt, mode, controls=SamplingControls(logit_bias=((banned, -100.0),)))
        assert banned not in biased.tokens
        assert len(biased.tokens) > 0


@pytest.mark.parametrize("mode", MODES)
def test_min_tokens_delays_eos(fixture_model, prompts, mode):
    """With EOS forced (logit_bias +100) the output is EOS at once; min_tokens 10 holds it back to the
    11th token."""
    eos = fixture_model.config.eos_token_id
    forced = ((eos, 100.0),)
    plain = _generate(fixture_model, prompts[0], mode, controls=SamplingControls(logit_bias=forced))
    assert plain.tokens == [eos]
    delayed = _generate(fixture_model, prompts[0], mode, controls=SamplingControls(logit_bias=forced, min_tokens=10))
    assert len(delayed.tokens) == 11 and delayed.tokens[-1] == eos and eos not in delayed.tokens[:10]


@pytest.mark.parametrize("mode", ("ar", "linear_spec"))
def test_stop_token_ids_end_the_output(fixture_model, prompts, mode):
    plain = _generate(fixture_model, prompts[0], mode).tokens
    stop = plain[5]
    stopped = _generate(fixture_model, prompts[0], mode, controls=SamplingControls(stop_token_ids=(stop,)))
    assert stopped.tokens == plain[: plain.index(stop) + 1]
    assert stopped.finish_reason == "stop"


@pytest.mark.parametrize(
    "controls",
    [
        SamplingControls(frequency_penalty=2.0),
        SamplingControls(presence_penalty=2.0),
        SamplingControls(repetition_penalty=2.0),
    ],
    ids=["frequency", "presence", "repetition"],
)
def test_penalties_reduce_repeats(fixture_model, prompts, controls):
    def repeats(tokens: list[int]) -> int:
        return len(tokens) - len(set(tokens))

    plain = sum(repeats(_generate(fixture_model, p, "ar", max_new_tokens=48).tokens) for p in prompts)
    penalised = sum(
        repeats(_generate(fixture_model, p, "ar", max_new_tokens=48, controls=controls).tokens) for p in prompts
    )
    assert penalised < plain
    # a negative frequency penalty rewards repeats
    if controls.frequency_penalty:
        rewarded = SamplingControls(frequency_penalty=-1.0)
        more = sum(
            repeats(_generate(fixture_model, p, "ar", max_new_tokens=48, controls=rewarded).tokens) for p in prompts
        )
        assert more > plain


# ----- lossless under controls -------------------------------------------------------------------------
@pytest.mark.parametrize("mode", SPEC)
def test_speculation_equals_ar_under_every_control(fixture_model, prompts, mode):
    """Penalties and min_tokens depend on the tokens before each row: a verify row must count the
    draft tokens before it exactly as the AR step that produces the same token does."""
    eos = fixture_model.config.eos_token_id
    controls = SamplingControls(
        frequency_penalty=0.7,
        presence_penalty=0.3,
        repetition_penalty=1.3,
        logit_bias=((eos, 2.0), (prompts[0][-1], -3.0)),
        min_tokens=6,
    )
    for prompt in prompts:
        ar = _generate(fixture_model, prompt, "ar", max_new_tokens=40, controls=controls, logprobs=2)
        spec = _generate(fixture_model, prompt, mode, max_new_tokens=40, controls=controls, logprobs=2)
        assert spec.tokens == ar.tokens
        assert max(spec.accepted_lengths, default=1) > 1 or mode == "quadratic_spec"
        for (lp_s, top_s), (lp_a, top_a) in zip(spec.logprobs, ar.logprobs):
            assert lp_s == pytest.approx(lp_a, abs=1e-5)
            assert [t for t, _ in top_s] == [t for t, _ in top_a]


# ----- distributions --------------------------------------------------------------------------------
def _kept(probs: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """The truncated distribution, computed the plain way (one token at a time)."""
    order = sorted(range(len(probs)), key=lambda t: -float(probs[t]))
    kept, total = [], 0.0
    for t in order:
        if (top_k and len(kept) >= top_k) or total >= top_p:
            break
        kept.append(t)
        total += float(probs[t])
    out = torch.zeros_like(probs)
    out[kept] = probs[kept]
    return out / out.sum()


@pytest.fixture(scope="module")
def small_vocab_model():
    return random_model(seed=3, vocab_size=12, block_size=4)


@pytest.mark.parametrize(
    ("mode", "controls"),
    [
        ("linear_spec", SamplingControls(top_k=3)),
        ("linear_spec", SamplingControls(top_p=0.7)),
        ("quadratic_spec", SamplingControls(top_k=4, top_p=0.8)),
    ],
)
def test_speculation_keeps_the_truncated_ar_distribution(small_vocab_model, mode, controls):
    """Tokens 1 and 2 (the second can come from an accepted draft) against the exact truncated AR
    distribution, over many seeds."""
    model = small_vocab_model
    eos, vocab = model.config.eos_token_id, model.config.vocab_size
    first = _kept(_next_token_probs(model, PROMPT), controls.top_k, controls.top_p)
    second = torch.zeros_like(first)
    for t1 in range(vocab):
        if t1 != eos and first[t1] > 0:
            second += first[t1] * _kept(_next_token_probs(model, PROMPT + [t1]), controls.top_k, controls.top_p)
    second /= second.sum()
    counts = [torch.zeros(vocab, dtype=torch.float64) for _ in range(2)]
    drafted = 0
    for seed in range(SAMPLES):
        out = models.generate(model, PROMPT, mode=mode, max_new_tokens=3, temperature=1.0, seed=seed, controls=controls)
        for position, token in enumerate(out.tokens[:2]):
            counts[position][token] += 1
        drafted += any(n > 1 for n in out.accepted_lengths)
    assert counts[0][first == 0].sum() == 0 and counts[1][second == 0].sum() == 0, "a truncated token was emitted"
    for observed, expected in zip(counts, (first, second)):
        assert chi_square_p_value(observed, expected) > 1e-3
    assert drafted > SAMPLES // 20


# ----- logprobs -----------------------------------------------------------------------------------------
def test_greedy_ar_logprobs_are_the_models(fixture_model, prompts):
    prompt = prompts[0]
    out = _generate(fixture_model, prompt, "ar", logprobs=3)
    scored = models.score(fixture_model, prompt + out.tokens)[len(prompt) - 1 :]
    assert [lp for lp, _ in out.logprobs] == pytest.approx(scored, abs=1e-4)
    for token, (lp, top) in zip(out.tokens, out.logprobs):
        assert len(top) == 3 and top[0][0] == token and top[0][1] == pytest.approx(lp)


def test_sampled_logprobs_follow_temperature_and_truncation(fixture_model, prompts):
    """At temperature 0.5 with top_k 5 a token's distribution is the top 5 at that temperature: its
    logprobs sum to 1 over the alternatives and the chosen token is among them."""
    out = _generate(
        fixture_model, prompts[1], "ar", temperature=0.5, seed=1, controls=SamplingControls(top_k=5), logprobs=5
    )
    for token, (lp, top) in zip(out.tokens, out.logprobs):
        assert token in dict(top) and dict(top)[token] == pytest.approx(lp)
        assert sum(math.exp(v) for _, v in top) == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize("temperature", (0.0, 1.0))
def test_diffusion_logprobs_cover_every_token(fixture_model, prompts, temperature):
    out = _generate(fixture_model, prompts[2], "diffusion", temperature=temperature, seed=3, logprobs=1)
    assert len(out.logprobs) == len(out.tokens)
    for token, (lp, top) in zip(out.tokens, out.logprobs):
        assert lp <= 0.0 and math.isfinite(lp)
        if temperature == 0.0:
            assert top[0][0] == token  # greedy: the token is the likeliest of what it was chosen from


# ----- the batched row processing -------------------------------------------------------------------------
def test_a_row_is_shaped_the_same_alone_or_in_a_batch():
    torch.manual_seed(0)
    logits = torch.randn(7, 50)
    a = RowsOf(
        SamplingControls(frequency_penalty=0.5, repetition_penalty=1.5), (3,), [1, 2], [4, 4, 5], [-1, 6, 7, -1], 3
    )
    b = RowsOf(SamplingControls(logit_bias=((9, 5.0),), min_tokens=2), (3, 8), [1], [], [-1, 2, -1], 0)
    both = shape_logits(logits, [a, b])
    assert torch.equal(both[:4], shape_logits(logits[:4], [a]))
    assert torch.equal(both[4:], shape_logits(logits[4:], [b]))
    # row 2 of a counts 4 twice and 5, 6 and 7 once; 1 and 2 are in the prompt
    counts = torch.zeros(50)
    counts[[4, 5, 6, 7]] = torch.tensor([2.0, 1.0, 1.0, 1.0])
    seen = counts > 0
    seen[[1, 2]] = True
    row = logits[2]
    expected = torch.where(seen, torch.where(row > 0, row / 1.5, row * 1.5), row) - 0.5 * counts
    assert torch.allclose(both[2], expected)
    assert both[4, 3] == -math.inf and both[5, 8] == -math.inf and both[6, 3] == logits[6, 3]  # min_tokens 2
    assert both[6, 9] == pytest.approx(float(logits[6, 9]) + 5.0)


def test_truncation_keeps_what_each_rule_keeps():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.5, 0.3, 0.15, 0.05], [0.5, 0.3, 0.15, 0.05]])
    out = truncate(probs, [SamplingControls(top_k=2), SamplingControls(top_p=0.8), SamplingControls(min_p=0.2)])
    assert torch.allclose(out[0], torch.tensor([0.625, 0.375, 0.0, 0.0]))
    assert torch.allclose(out[1], torch.tensor([0.625, 0.375, 0.0, 0.0]))
    assert torch.allclose(out[2], torch.tensor([0.5, 0.3, 0.15, 0.0]) / 0.95)


def _count_short_path_steps(monkeypatch) -> list[int]:
    """A list that gains an entry whenever the sampler takes its short path (``_greedy_choices``)."""
    from models.engine import sampler as sampling

    calls: list[int] = []
    short = sampling.Sampler._greedy_choices

    def spy(self, logits, items):
        calls.append(1)
        return short(self, logits, items)

    monkeypatch.setattr(sampling.Sampler, "_greedy_choices", spy)
    return calls


def test_plain_greedy_steps_take_the_short_path_and_match_the_general_one(monkeypatch):
    """A step of plain greedy work only (AR choices, verifies, linear drafts; no control that shapes
    logits, no logprobs) is answered by one argmax over its rows: its results equal the general path's,
    rows in any order, ties to the lowest index, drafts never the mask token; any other work in the step
    sends the whole step down the general path."""
    from models.engine import sampler as sampling
    from models.modes import DecodeParams, make_state
    from models.modes.base import Draft, Verify

    config = random_model(seed=1).config
    mask = config.mask_token_id
    logits = torch.randn(16, config.vocab_size, generator=torch.Generator().manual_seed(0))
    logits[4, 7] = logits[4, 9] = logits[4].max() + 1  # a tie
    logits[12, mask] = logits[12].max() + 1  # a draft row whose best token is the mask
    ar = [int(t) for t in logits.argmax(-1)]
    drafted = [ar[12 + j] if j else int(logits[12].topk(2).indices[1]) for j in range(3)]
    plain = DecodeParams(mode="ar")
    shaped = DecodeParams(mode="ar", controls=SamplingControls(logit_bias=((3, 100.0),)))
    works = [
        (Verify(), 4),  # an AR choice
        (Verify([ar[0], ar[1], 5 if ar[2] != 5 else 6]), 0),  # two accepted, the third rejected
        (Verify([ar[6], ar[7]]), 6),  # all accepted: the bonus is row 8's
        (Draft(3), 12),  # a linear draft's three tokens, the mask excluded
    ]
    expected = [[0, 7], [2, ar[2]], [2, ar[8]], drafted]

    def results(params: list[DecodeParams]) -> list[list[int]]:
        items = [sampling.Item(make_state([1, 2], p, config), w, row) for p, (w, row) in zip(params, works)]
        return sampling.Sampler(None, mask).run(logits, items)

    calls = _count_short_path_steps(monkeypatch)
    assert results([plain] * 4) == expected and calls
    lone = sampling.Item(make_state([1, 2], plain, config), Draft(3), 0)  # its rows are all the logits
    assert sampling.Sampler(None, mask).run(logits[12:15].clone(), [lone]) == [drafted]
    calls.clear()
    mixed = results([shaped, plain, plain, plain])
    assert not calls and mixed == [[0, 3], *expected[1:]]  # the bias of 100 makes token 3 the argmax
    monkeypatch.setattr(sampling, "_plain_greedy", lambda item, on_cpu: False)
    assert results([plain] * 4) == expected and not calls  # the general path, on the same rows


def _steps_on_both_paths(monkeypatch, params, kind) -> tuple[list[str], bool]:
    """Run requests with ``params`` through an engine alone and sharing steps, on the short path and then
    on the general one: asserts that every step's results agree and that every step took the short path
    first; returns the kinds of work seen (``kind`` names one) and whether the short path was taken."""
    from models.engine import Engine
    from models.engine import sampler as sampling

    model = random_model(seed=7)
    prompts = [[1, 5 + i, 9, 14 + 3 * i, 22, 7 + i] for i in range(len(params))]
    general = sampling.Sampler.run

    def steps(batched: bool) -> tuple[list[list[list[int]]], list[str]]:
        results, kinds = [], []

        def recording(self, logits, items):
            out = general(self, logits, items)
            results.append(out)
            kinds.extend(filter(None, (kind(item, result) for item, result in zip(items, out))))
            return out

        monkeypatch.setattr(sampling.Sampler, "run", recording)
        engine = Engine(model, num_pages=64, page_size=8, speculation_max_batch=None)
        for i, (prompt, p) in enumerate(zip(prompts, params)):
            engine.add_request(str(i), prompt, p)
            while not batched and engine.has_work:
                engine.step()
        while engine.has_work:
            engine.step()
        return results, kinds

    calls = _count_short_path_steps(monkeypatch)
    fast = {batched: steps(batched) for batched in (False, True)}
    every_step = len(calls) == sum(len(results) for results, _ in fast.values())
    monkeypatch.setattr(sampling, "_plain_greedy", lambda item, on_cpu: False)
    calls.clear()
    for batched in (False, True):
        assert steps(batched) == fast[batched]
    assert not calls
    return fast[False][1] + fast[True][1], every_step


def test_greedy_quadratic_steps_take_the_short_path_and_match_the_general_one(monkeypatch):
    """Quadratic speculation's greedy work (drafts alone that choose acceptance lengths, cycles whose
    verify selects a drafted branch or none) takes the short path too: every step's results equal the
    general path's, for requests alone and sharing steps, with one branch and several."""
    from models.modes import DecodeParams
    from models.modes.base import Draft

    params = [
        DecodeParams(mode="quadratic_spec", max_new_tokens=20, block_length=length, branches=branches)
        for length, branches in ((4, 1), (8, 3), (8, None))
    ]

    def kind(item, result):
        work = item.work
        if isinstance(work, Draft) and work.choose:
            return "alone" if work.verify is None else "missed" if result[2] < 0 else "hit"
        return None

    kinds, every_step = _steps_on_both_paths(monkeypatch, params, kind)
    assert every_step
    assert {"alone", "hit", "missed"} <= set(kinds), kinds


def test_greedy_diffusion_passes_take_the_short_path_and_match_the_general_one(monkeypatch):
    """Greedy diffusion passes (a threshold, none, a step budget that commits several slots a pass, AR
    requests beside them) take the short path on the CPU: every pass commits what the general path's
    ``kernels.unmask`` commits; a pass that revises takes the general path."""
    from models.modes import DecodeParams
    from models.modes.base import Unmask

    params = [
        DecodeParams(mode="diffusion", max_new_tokens=16, block_length=8, threshold=0.05),
        DecodeParams(mode="diffusion", max_new_tokens=16, block_length=8, threshold=None),
        DecodeParams(mode="diffusion", max_new_tokens=16, block_length=8, threshold=0.9, max_steps=2),
        DecodeParams(mode="ar", max_new_tokens=8),
    ]

    def kind(item, result):
        if not isinstance(item.work, Unmask):
            return None
        committed = sum(1 for old, new in zip(item.work.block, result) if old != new)
        return "several" if committed > 1 else "one"

    kinds, every_step = _steps_on_both_paths(monkeypatch, params, kind)
    assert every_step
    assert {"one", "several"} <= set(kinds), kinds
    revising = [DecodeParams(mode="diffusion", max_new_tokens=8, block_length=8, revise=0.5)]
    _, every_step = _steps_on_both_paths(monkeypatch, revising, lambda item, result: None)
    assert not every_step  # its passes took the general path (and agreed with themselves)
