"""Self-speculation at temperature 0 emits exactly the AR greedy tokens."""

from __future__ import annotations

import random
import sysconfig
from pathlib import Path

import pytest
import torch

import models
from models.modes.base import DecodeParams, Verify
from models.modes.linear_spec import LinearSpecState
from models.modes.quadratic_spec import QuadraticSpecState
from tests.conftest import REPO, random_model, tiny_config

BLOCK_LENGTHS = (4, 8, 16, 32)
SPEC_MODES = ("linear_spec", "quadratic_spec")


def _heldout_prompts(tokenizer, count: int, rng: random.Random) -> list[list[int]]:
    """Prompts cut from held-out standard-library modules (names t-z) at random places."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.glob("[t-z]*.py"))
    prompts = []
    for path in rng.sample(files, count):
        ids = tokenizer.encode(path.read_text(errors="replace"))
        start = rng.randrange(1, max(2, len(ids) - 64))
        prompts.append([tokenizer.bos_token_id] + ids[start : start + rng.randrange(8, 48)])
    return prompts


def _assert_spec_equals_ar_on_heldout(model, prompts: int, block_length: int) -> None:
    rng = random.Random(block_length)
    for prompt in _heldout_prompts(model.tokenizer, prompts, rng):
        ar = models.generate(model, prompt, mode="ar", max_new_tokens=40)
        for mode in SPEC_MODES:
            spec = models.generate(model, prompt, mode=mode, max_new_tokens=40, block_length=block_length)
            assert spec.tokens == ar.tokens, (mode, block_length, prompt)


@pytest.mark.parametrize("block_length", BLOCK_LENGTHS)
def test_spec_equals_ar_on_fixture(fixture_model, block_length):
    _assert_spec_equals_ar_on_heldout(fixture_model, 3, block_length)


@pytest.mark.parametrize("block_length", (8, 32))
def test_spec_equals_ar_on_the_bundled_model_in_bf16(block_length):
    """bf16 is what the default app computes on CPUs with bf16 instructions (oneDNN-packed bf16
    products there; the padded reference elsewhere): verify rows must round like AR steps in it too."""
    model = models.load_model(REPO / "models" / "bundled" / "tiny-code", dtype=torch.bfloat16)
    _assert_spec_equals_ar_on_heldout(model, 2, block_length)


def test_spec_equals_ar_random_prompts_random_model():
    model = random_model(seed=7)
    rng = random.Random(0)
    accepted_any = False
    for trial in range(24):
        prompt = [1] + [rng.randrange(4, model.config.vocab_size) for _ in range(rng.randrange(1, 30))]
        length = BLOCK_LENGTHS[trial % len(BLOCK_LENGTHS)]
        ar = models.generate(model, prompt, mode="ar", max_new_tokens=24)
        for mode in SPEC_MODES:
            spec = models.generate(model, prompt, mode=mode, max_new_tokens=24, block_length=length)
            assert spec.tokens == ar.tokens, (mode, length, prompt)
            accepted_any |= any(n > 1 for n in spec.accepted_lengths)
    assert accepted_any, "no draft token was ever accepted: the test did not exercise acceptance"


@pytest.mark.parametrize("block_length", (4, 8))
def test_sparse_quadratic_equals_ar_for_any_branch_count(block_length):
    """One branch drafted ahead, two, four, and every acceptance length (the dense scheme). A branch drafts
    behind the bonus token it guesses; where the verify's acceptance and bonus match no branch, the next
    forward drafts alone behind the bonus. Both kinds of draft are exercised."""
    model = random_model(seed=7)
    rng = random.Random(block_length)
    missed = ahead = dense_ahead = False
    for _ in range(6):
        prompt = [1] + [rng.randrange(4, model.config.vocab_size) for _ in range(rng.randrange(1, 30))]
        ar = models.generate(model, prompt, mode="ar", max_new_tokens=24)
        for branches in (1, 2, 4, block_length + 1):
            spec = models.generate(
                model, prompt, mode="quadratic_spec", max_new_tokens=24, block_length=block_length, branches=branches
            )
            assert spec.tokens == ar.tokens, (branches, prompt)
            verifies = len(spec.accepted_lengths)
            drafts_alone = spec.nfe - 1 - verifies  # the prefill counts; each draft alone is verified next
            from_branches = verifies - drafts_alone
            missed |= drafts_alone > 1  # the first one drafts behind the prefill's token
            ahead |= from_branches > 0
            dense_ahead |= branches > block_length and from_branches > 0
    assert missed, "no acceptance and bonus ever fell outside the drafted branches"
    assert ahead and dense_ahead, "no draft a branch made ahead was ever verified"


def test_branches_go_to_the_likeliest_outcomes_behind_their_guessed_bonus():
    """Outcome a (accept a draft tokens, the verify puts the guess g_{a+1} after them) has likelihood
    c_1 .. c_a g_{a+1}; a whole accepted draft c_1 .. c_n, with nothing guessed after it (seed -1)."""
    from models.engine.sampler import likely_acceptances

    confidence, guess, guess_p = [0.9, 0.5, 0.2], [11, 12, 13], [0.05, 0.4, 0.7]
    # P(0) = 0.05, P(1) = 0.9 * 0.4 = 0.36, P(2) = 0.9 * 0.5 * 0.7 = 0.315, P(3) = 0.9 * 0.5 * 0.2 = 0.09
    for choose, lengths, seeds in (
        (1, [1], [12]),
        (2, [1, 2], [12, 13]),
        (3, [1, 2, 3], [12, 13, -1]),
        (4, [0, 1, 2, 3], [11, 12, 13, -1]),
        (6, [0, 1, 2, 3, -1, -1], [11, 12, 13, -1, -1, -1]),  # more asked for than there are outcomes
    ):
        assert likely_acceptances(confidence, guess, guess_p, choose) == (lengths, seeds), choose
    # equally likely outcomes: the shorter first (a certain draft token leaves P(a) unchanged)
    assert likely_acceptances([1.0, 0.5], [5, 6], [0.5, 0.5], 2) == ([0, 1], [5, 6])  # all three at 0.5


def test_quadratic_requests_with_other_branch_counts_share_steps_losslessly():
    """One engine step carries requests that draft ahead for 1, 3 and every outcome, at two block
    lengths: each one's result row holds its own draft, lengths and seeds, and each emits AR's tokens."""
    from models.engine import Engine
    from models.modes import DecodeParams

    model = random_model(seed=7)
    rng = random.Random(3)
    prompts = [[1] + [rng.randrange(4, model.config.vocab_size) for _ in range(5 + 4 * i)] for i in range(4)]
    params = [
        DecodeParams(mode="quadratic_spec", max_new_tokens=24, block_length=length, branches=branches)
        for length, branches in ((4, 1), (8, 3), (4, 5), (8, None))
    ]
    engine = Engine(model, num_pages=64, page_size=8, speculation_max_batch=None)
    states = [engine.add_request(str(i), prompt, p).state for i, (prompt, p) in enumerate(zip(prompts, params))]
    got: dict[str, list[int]] = {}
    while engine.has_work:
        for o in engine.step():
            got.setdefault(o.request_id, []).extend(o.new_tokens)
        for state in states:  # what each read from its row: acceptance lengths of its draft, their seeds
            count = len(state.verify) - 1
            assert len(state.branches) == len(state.seeds) <= state.max_branches
            for a, seed in zip(state.branches, state.seeds):
                assert 0 <= a <= count and (seed == -1) == (a == count) and seed < model.config.vocab_size
    for i, prompt in enumerate(prompts):
        assert got[str(i)] == models.generate(model, prompt, mode="ar", max_new_tokens=24).tokens, i


@pytest.mark.parametrize(("emitted", "window"), [([], 31), ([6], 31), ([6, 5], 15), ([1, 1], 3), ([32, 32], 31)])
def test_the_verify_window_follows_what_cycles_emit(emitted, window):
    """Whole drafts until two cycles are done, then rows for twice the tokens a cycle emits, a power of two."""
    state = LinearSpecState([1, 5], DecodeParams(mode="linear_spec", block_length=32), tiny_config())
    state.accepted_lengths = list(emitted)
    assert state.verify_window() == window


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("state_class", [LinearSpecState, QuadraticSpecState])
def test_verifies_check_the_window_and_stay_lossless(monkeypatch, state_class, temperature):
    """On the bundled model's held-out code (4-5 drafts accepted a cycle) verifies shrink to the window
    after two cycles, in both speculative modes (quadratic: its branches draft the window's rows too);
    greedy tokens stay AR's, sampled cycles slice the draft's probabilities alike."""
    model = models.load_model(REPO / "models" / "bundled" / "tiny-code")
    windows: list[int] = []
    plan_decode = state_class.plan_decode

    def spy(self):
        plan = plan_decode(self)
        verify = plan.work if isinstance(plan.work, Verify) else getattr(plan.work, "verify", None)
        if verify is not None and verify.draft:
            windows.append(len(verify.draft))
            assert verify.q is None or verify.q.shape[0] == len(verify.draft)
            assert len(plan.segments[0].tokens) == len(verify.draft) + 1  # the verify block: the window's rows
            for branch in plan.segments[1:]:  # a quadratic cycle's branches: the next window's rows deferred
                assert len(branch.tokens) == 32 and len(branch.deferred_rows) == plan.work.count
        return plan

    monkeypatch.setattr(state_class, "plan_decode", spy)
    prompt = _heldout_prompts(model.tokenizer, 1, random.Random(5))[0]
    spec = models.generate(model, prompt, mode=state_class.mode, max_new_tokens=96, temperature=temperature, seed=3)
    assert windows[:2] == [31, 31] and any(w < 31 for w in windows[2:])
    if temperature == 0:
        assert spec.tokens == models.generate(model, prompt, mode="ar", max_new_tokens=96).tokens
