"""At temperature 1 the speculative modes keep the AR output distribution.

The exact AR distributions of the first two tokens are computed from the model itself; each
mode's empirical frequencies over many seeds must pass a chi-square test against them. Biased
acceptance (e.g. keeping every draft token) changes the second token's distribution and fails.
"""

from __future__ import annotations

import math

import pytest
import torch

import models
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
    """P(t1), and P(t2) over requests whose first token is not EOS (EOS ends a request)."""
    model = small_vocab_model
    first = _next_token_probs(model, PROMPT)
    second = torch.zeros_like(first)
    for t1 in range(model.config.vocab_size):
        if t1 != model.config.eos_token_id:
            second += first[t1] * _next_token_probs(model, PROMPT + [t1])
    return first, second / second.sum()


def sample_counts(model, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    vocab = model.config.vocab_size
    c1 = torch.zeros(vocab, dtype=torch.float64)
    c2 = torch.zeros(vocab, dtype=torch.float64)
    for seed in range(SAMPLES):
        out = models.generate(model, PROMPT, mode=mode, max_new_tokens=2, temperature=1.0, seed=seed)
        c1[out.tokens[0]] += 1
        if len(out.tokens) > 1:
            c2[out.tokens[1]] += 1
    return c1, c2


@pytest.mark.parametrize("mode", ["ar", "linear_spec", "quadratic_spec"])
def test_first_two_tokens_follow_ar_distribution(small_vocab_model, exact, mode):
    first, second = exact
    c1, c2 = sample_counts(small_vocab_model, mode)
    assert chi_square_p_value(c1, first) > 1e-3
    assert chi_square_p_value(c2, second) > 1e-3


def test_biased_acceptance_would_be_caught(small_vocab_model, exact, monkeypatch):
    """Accepting every draft token (no rejection step) must fail the same check."""
    from kernels.verify_accept import inverse_cdf

    def accept_all(draft, p, q, accept_u, sample_u, eos_id, draft_lengths):
        accepted = draft_lengths.clone()
        bonus = inverse_cdf(p[torch.arange(len(accepted)), accepted], sample_u)
        tokens = torch.cat([draft, draft.new_full((len(draft), 1), -1)], dim=1).scatter(
            1, accepted[:, None], bonus[:, None]
        )
        return accepted, tokens, accepted + 1

    monkeypatch.setattr("kernels.verify_accept_sampled", accept_all)
    _, c2 = sample_counts(small_vocab_model, "linear_spec")
    assert chi_square_p_value(c2, exact[1]) < 1e-3
