"""Speculative acceptance kernels (greedy and rejection sampling) vs PyTorch references, on CPU through the
Triton interpreter. Token outputs must match exactly; random inputs keep a clear margin from every
decision boundary because the reference computes in float64 and the kernel in fp32."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from kernels.verify_accept import (  # noqa: E402
    verify_accept_reference,
    verify_accept_sampled_reference,
    verify_accept_sampled_triton,
    verify_accept_triton,
)

EOS = 2


def _same(got, expected) -> None:
    for g, e in zip(got, expected):
        assert g.dtype == torch.int64
        assert torch.equal(g, e)


def test_greedy_by_hand() -> None:
    ar = torch.tensor(
        [
            [5, 6, 7, 8, 9],  # all four drafts accepted, bonus 9
            [5, 6, 7, 8, 9],  # first draft rejected
            [5, 6, 7, 8, 9],  # rejected at 2
            [5, EOS, 7, 8, 9],  # 3 accepted, EOS among them at 1: cut after it
            [5, 6, EOS, 8, 9],  # the AR token at the rejection is EOS
            [5, 6, 7, 8, 9],  # ragged: 2 drafts, the padding would match
            [5, 6, 7, 8, 9],  # ragged: no draft at all
        ]
    )
    draft = torch.tensor(
        [[5, 6, 7, 8], [4, 6, 7, 8], [5, 6, 0, 8], [5, EOS, 7, 0], [5, 6, 0, 8], [5, 6, 7, 8], [5, 6, 7, 8]]
    )
    lengths = torch.tensor([4, 4, 4, 4, 4, 2, 0])
    got = verify_accept_triton(draft, ar, EOS, lengths)
    _same(got, verify_accept_reference(draft, ar, EOS, lengths))
    accepted, tokens, counts = got
    assert accepted.tolist() == [4, 0, 2, 3, 2, 2, 0]
    assert counts.tolist() == [5, 1, 3, 2, 3, 3, 1]
    assert tokens[0].tolist() == [5, 6, 7, 8, 9]
    assert tokens[1].tolist() == [5, -1, -1, -1, -1]
    assert tokens[3].tolist() == [5, EOS, -1, -1, -1]
    assert tokens[4].tolist() == [5, 6, EOS, -1, -1]
    assert tokens[5].tolist() == [5, 6, 7, -1, -1]
    assert tokens[6].tolist() == [5, -1, -1, -1, -1]


@pytest.mark.parametrize("eos_id", [EOS, None])
@pytest.mark.parametrize("ragged", [True, False])
def test_greedy_random_batch(eos_id: int | None, ragged: bool) -> None:
    gen = torch.Generator().manual_seed(3)
    batch, width = 24, 7
    ar = torch.randint(0, 6, (batch, width), generator=gen)
    draft = ar[:, :-1].clone()
    flips = torch.rand(batch, width - 1, generator=gen) < 0.2  # long accepted runs are common
    draft[flips] = torch.randint(0, 6, (int(flips.sum()),), generator=gen)
    lengths = torch.randint(0, width, (batch,), generator=gen) if ragged else None
    _same(verify_accept_triton(draft, ar, eos_id, lengths), verify_accept_reference(draft, ar, eos_id, lengths))


def _sampled_inputs(batch: int, width: int, vocab: int, seed: int):
    """p, q from random logits, drafts drawn from q, accept uniforms at least 0.01 from p/q."""
    gen = torch.Generator().manual_seed(seed)
    p = torch.softmax(torch.randn(batch, width, vocab, generator=gen) * 2, dim=-1)
    q = torch.softmax(torch.randn(batch, width - 1, vocab, generator=gen) * 2, dim=-1)
    draft = torch.multinomial(q.view(-1, vocab), 1, generator=gen).view(batch, width - 1)
    ratio = (p[:, :-1].gather(-1, draft[..., None]) / q.gather(-1, draft[..., None])).squeeze(-1)
    u = torch.rand(batch, width - 1, generator=gen) * 0.6  # accept more often than not
    close = (u - ratio).abs() < 0.01
    u = torch.where(close, torch.where(ratio > 0.5, ratio - 0.3, ratio + 0.3), u)
    return draft, p, q, u, torch.rand(batch, generator=gen)


def _centre_draws(draft, p, q, u, sample_u, lengths) -> torch.Tensor:
    """Move each block's draw uniform to the middle of the bucket it falls in, away from rounding."""
    accepted, _, _ = verify_accept_sampled_reference(draft, p, q, u, sample_u, None, lengths)
    out = sample_u.clone()
    for b, a in enumerate(accepted.tolist()):
        n = draft.shape[1] if lengths is None else int(lengths[b])
        w = p[b, a].double() if a == n else (p[b, a] - q[b, a]).double().clamp(min=0)
        if a < n and w.sum() == 0:
            w = p[b, a].double()
        cdf = torch.cumsum(w, 0)
        j = int(torch.searchsorted(cdf, sample_u[b] * cdf[-1], right=True).clamp(max=len(w) - 1))
        lo = cdf[j - 1] if j else 0.0
        out[b] = float((lo + cdf[j]) / 2 / cdf[-1])
    return out


@pytest.mark.parametrize(
    ("batch", "width", "vocab", "ragged"), [(12, 5, 37, True), (12, 6, 64, False), (3, 4, 4500, True)]
)
def test_sampled_matches_reference(batch: int, width: int, vocab: int, ragged: bool) -> None:
    draft, p, q, u, sample_u = _sampled_inputs(batch, width, vocab, seed=vocab)
    draft[:, 0] = torch.where(torch.arange(batch) % 4 == 0, EOS, draft[:, 0])  # some EOS among the drafts
    lengths = torch.randint(0, width, (batch,), generator=torch.Generator().manual_seed(1)) if ragged else None
    sample_u = _centre_draws(draft, p, q, u, sample_u, lengths)
    got = verify_accept_sampled_triton(draft, p, q, u, sample_u, EOS, lengths)
    _same(got, verify_accept_sampled_reference(draft, p, q, u, sample_u, EOS, lengths))
    accepted = got[0]
    assert 0 < int(accepted.sum()) < batch * (width - 1)  # both outcomes exercised


def test_sampled_edge_cases() -> None:
    """q(d) = 0 accepts; p <= q everywhere at a rejection draws from p; a uniform just under 1 draws
    the last token of positive weight."""
    vocab, width = 8, 3
    p = torch.full((3, width, vocab), 1.0 / vocab)
    q = torch.full((3, width - 1, vocab), 1.0 / vocab)
    draft = torch.tensor([[1, 4], [1, 4], [1, 4]])
    u = torch.tensor([[0.99, 0.5], [0.9, 0.1], [0.1, 0.1]])
    q[0, 0] = torch.tensor([0.5, 0.0, 0.5, 0, 0, 0, 0, 0])  # q(d_0) = 0: accepted whatever u says
    p[0, 1, 4] = 0.0  # d_1 then rejected (ratio 0); residual (p - q)+ has weight on all but token 4
    p[1, 0] = q[1, 0] * 0.5  # ratio 0.5 < u: rejected with an all-zero residual -> draw from p
    p[2, 2] = torch.tensor([0.0, 0.3, 0.0, 0.7, 0.0, 0.0, 0.0, 0.0])  # both accepted, bonus from p_2
    sample_u = torch.tensor([0.5, 0.999, 1.0 - 2**-24])
    got = verify_accept_sampled_triton(draft, p, q, u, sample_u, None)
    _same(got, verify_accept_sampled_reference(draft, p, q, u, sample_u, None))
    accepted, tokens, _ = got
    assert accepted.tolist() == [1, 0, 2]
    assert tokens[1].tolist() == [7, -1, -1] and tokens[2].tolist() == [1, 4, 3]
