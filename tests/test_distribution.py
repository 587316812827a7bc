"""At temperature 1 the speculative modes keep the AR output distribution.

The exact AR distributions of the first three tokens are computed from the model itself; each
mode's empirical frequencies over many seeds must pass a chi-square test against them. Biased
acceptance (e.g. keeping every draft token) changes the second token's distribution and fails.
Three tokens: the first comes from the prefill, the others from verified drafts, their bonus tokens
and, for quadratic speculation, the drafts its branches made ahead.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

import models
from models.engine import Engine
from models.modes import DecodeParams
from tests.conftest import random_model

PROMPT = [1, 9, 4, 11]
SAMPLES = 500


def _next_token_probs(model, prefix: list[int]) -> torch.Tensor:
    vocab = model.config.vocab_size
    return torch.tensor([math.exp(models.score(model, prefix + [t])[-1]) for t in range(vocab)], dtype=torch.float64)


def chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Upper tail of Pearson's chi-square (cells with expectation < 5 pooled; Wilson-Hilferty)."""
    expected = probs * counts.sum()
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum().view(1)])
    exp = torch.cat([expected[big], expected[~big].sum().view(1)])
    keep = exp > 0
    obs, exp = obs[keep], exp[keep]
    stat = float(((obs - exp) ** 2 / exp).sum())
    dof = len(obs) - 1
    z = ((stat / dof) ** (1 / 3) - (1 - 2 / (9 * dof))) / math.sqrt(2 / (9 * dof))
    return 0.5 * math.erfc(z / math.sqrt(2))


@pytest.fixture(scope="module")
def small_vocab_model():
    return random_model(seed=3, vocab_size=12, block_size=4)


@pytest.fixture(scope="module")
def exact(small_vocab_model):
    return exact_distributions(small_vocab_model)


def exact_distributions(model) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """P(t1), P(t2) and P(t3) after PROMPT, each over requests whose earlier tokens are not EOS (EOS ends
    a request)."""
    eos, vocab = model.config.eos_token_id, model.config.vocab_size
    first = _next_token_probs(model, PROMPT)
    second = torch.zeros_like(first)
    third = torch.zeros_like(first)
    for t1 in range(vocab):
        if t1 != eos:
            after_t1 = first[t1] * _next_token_probs(model, PROMPT + [t1])
            second += after_t1
            for t2 in range(vocab):
                if t2 != eos:
                    third += after_t1[t2] * _next_token_probs(model, PROMPT + [t1, t2])
    return first, second / second.sum(), third / third.sum()


def sample_counts(model, mode: str, branches: int | None = None) -> tuple[list[torch.Tensor], int]:
    """Counts of tokens 1..3 over the seeds, and how many requests accepted a draft token."""
    counts = [torch.zeros(model.config.vocab_size, dtype=torch.float64) for _ in range(3)]
    accepted_a_draft = 0
    for seed in range(SAMPLES):
        out = models.generate(model, PROMPT, mode=mode, max_new_tokens=3, temperature=1.0, seed=seed, branches=branches)
        for position, token in enumerate(out.tokens):
            counts[position][token] += 1
        accepted_a_draft += any(n > 1 for n in out.accepted_lengths)
    return counts, accepted_a_draft


# quadratic: the default (one branch: many cycles without a draft), two, and every acceptance length
@pytest.mark.parametrize(
    ("mode", "branches"),
    [("ar", None), ("linear_spec", None), ("quadratic_spec", None), ("quadratic_spec", 2), ("quadratic_spec", 4)],
)
def test_first_three_tokens_follow_ar_distribution(small_vocab_model, exact, mode, branches):
    counts, accepted_a_draft = sample_counts(small_vocab_model, mode, branches)
    for observed, expected in zip(counts, exact):
        assert chi_square_p_value(observed, expected) > 1e-3
    if mode != "ar":
        assert accepted_a_draft > SAMPLES // 20, "drafts were hardly ever accepted: the test did not exercise them"


@pytest.mark.parametrize(("mode", "position"), [("linear_spec", 1), ("quadratic_spec", 1)])
def test_biased_acceptance_would_be_caught(small_vocab_model, exact, monkeypatch, mode, position):
    """Accepting every draft token (no rejection step) must fail the same check at the first token a
    draft can supply."""
    from kernels.verify_accept import inverse_cdf

    def accept_all(draft, p, q, accept_u, sample_u, eos_id, draft_lengths):
        accepted = draft_lengths.clone()
        bonus = inverse_cdf(p[torch.arange(len(accepted)), accepted], sample_u)
        tokens = torch.cat([draft, draft.new_full((len(draft), 1), -1)], dim=1).scatter(
            1, accepted[:, None], bonus[:, None]
        )
        return accepted, tokens, accepted + 1

    monkeypatch.setattr("kernels.verify_accept_sampled", accept_all)
    counts, _ = sample_counts(small_vocab_model, mode)
    assert chi_square_p_value(counts[position], exact[position]) < 1e-3


@pytest.mark.parametrize("mode", ["linear_spec", "quadratic_spec"])
def test_ar_distribution_holds_whatever_the_steps_are(small_vocab_model, exact, mode):
    """At temperature 1, requests whose steps are cycles or AR steps at random (any interleaving a
    changing load can cause) still sample the first three tokens from AR's distribution."""
    model = small_vocab_model
    engine = Engine(model, num_pages=4 * SAMPLES, page_size=4, max_running=SAMPLES, speculation_max_batch=None)
    coin = random.Random(0)
    engine.scheduler.speculate = lambda request, load: coin.random() < 0.5
    params = [DecodeParams(mode=mode, max_new_tokens=3, temperature=1.0, seed=s) for s in range(SAMPLES)]
    states = [engine.add_request(f"s{s}", PROMPT, p).state for s, p in enumerate(params)]
    while engine.has_work:
        engine.step()
    counts = [torch.zeros(model.config.vocab_size, dtype=torch.float64) for _ in range(3)]
    for state in states:
        for position, token in enumerate(state.tokens):
            counts[position][token] += 1
    for observed, expected in zip(counts, exact):
        assert chi_square_p_value(observed, expected) > 1e-3
    assert sum(s.demoted_steps > 0 for s in states) > SAMPLES // 4
    assert sum(any(n > 1 for n in s.accepted_lengths) for s in states) > SAMPLES // 20
