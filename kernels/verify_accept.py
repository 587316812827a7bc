"""Speculative acceptance for a batch of verified blocks, on the device with no host round trip.

A verify pass of block b sees ``[next, d_1 .. d_n]`` and yields AR predictions for n + 1
positions. The accepted length ``a`` is the longest draft prefix the AR pass agrees with; the
block emits ``d[:a] + [t]`` (t: the AR token at position a, or at temperature > 0 the token
rejection sampling draws there), cut after the first EOS. Blocks may be ragged: ``draft_lengths``
[B] gives n per block (0 <= n <= L-1, not checked: that would take a host sync), drafts beyond
it are ignored.

Outputs, all int64: ``accepted`` [B] (a, for rolling the cache back to ``cached + a + 1``),
``tokens`` [B, L] (the emitted tokens, then -1), ``counts`` [B] (how many tokens are emitted).

The sampled variant takes its uniform random numbers as tensors (``accept_u`` [B, L-1] for the
accept tests, ``sample_u`` [B] for the one draw per block) so results are reproducible. It follows
``models.sampling.speculative_accept``: accept d_i iff q_i(d_i) = 0 or u_i < p_i(d_i) / q_i(d_i);
at the first rejection draw from (p_i - q_i)+ (p_i when that is all zero), after n acceptances
from p_n. A draw with weights w and uniform r is the first token whose running sum of w exceeds
r * sum(w). The reference works in float64, the kernel in fp32: ratios or running sums within
rounding of a decision boundary may decide differently.
"""

from __future__ import annotations

import functools

import torch


def _emit(draft: torch.Tensor, accepted: torch.Tensor, token: torch.Tensor, eos_id: int | None, width: int):
    """The tokens each block emits (``draft[:a] + [token]``, cut after the first EOS), padded with -1
    to ``width``, and their counts."""
    batch = draft.shape[0]
    pos = torch.arange(width, device=draft.device)
    padded = torch.cat([draft, draft.new_zeros((batch, width - draft.shape[1]))], dim=1)
    out = torch.where(pos < accepted[:, None], padded, torch.full_like(padded, -1))
    out = out.scatter(1, accepted[:, None], token[:, None])
    counts = accepted + 1
    if eos_id is not None:
        is_eos = (out == eos_id) & (pos < counts[:, None])
        counts = torch.where(is_eos.any(dim=1), is_eos.long().argmax(dim=1) + 1, counts)
        out = torch.where(pos < counts[:, None], out, torch.full_like(out, -1))
    return accepted, out, counts


def _lengths(draft: torch.Tensor, draft_lengths: torch.Tensor | None) -> torch.Tensor:
    if draft_lengths is None:
        return torch.full((draft.shape[0],), draft.shape[1], dtype=torch.long, device=draft.device)
    return draft_lengths.to(device=draft.device, dtype=torch.long)


def _first_or(flags: torch.Tensor, default: torch.Tensor) -> torch.Tensor:
    """Index of the first true flag per row, ``default`` where a row has none."""
    if not flags.shape[1]:
        return default.clone()
    return torch.where(flags.any(dim=1), flags.long().argmax(dim=1), default)


def verify_accept_reference(
    draft: torch.Tensor, ar: torch.Tensor, eos_id: int | None, draft_lengths: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Greedy acceptance. draft [B, L-1], ar [B, L] (AR argmax per position) -> accepted, tokens, counts.

    Vectorised over the batch (no host round trip): the accepted length is the first mismatch."""
    lengths = _lengths(draft, draft_lengths)
    n = draft.shape[1]
    inside = torch.arange(n, device=draft.device) < lengths[:, None]
    accepted = _first_or(inside & (draft != ar[:, :n]), lengths)
    return _emit(draft, accepted, ar.gather(1, accepted[:, None]).squeeze(1), eos_id, ar.shape[1])


def inverse_cdf(weights: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """One draw per row of ``weights`` [B, V] (any non-negative scale) with uniforms ``r`` [B]: the first
    token whose running sum exceeds ``r * sum``, or the last positive weight when rounding puts the
    target past the total. Sums in float64."""
    running = torch.cumsum(weights.double(), dim=1)
    hit = running > r.double()[:, None] * running[:, -1:]
    last_positive = weights.shape[1] - 1 - (weights > 0).flip(1).long().argmax(dim=1)
    return _first_or(hit, last_positive)


def verify_accept_sampled_reference(
    draft: torch.Tensor,
    p: torch.Tensor,
    q: torch.Tensor,
    accept_u: torch.Tensor,
    sample_u: torch.Tensor,
    eos_id: int | None,
    draft_lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rejection sampling. draft [B, L-1], p [B, L, V] target, q [B, L-1, V] draft probabilities,
    accept_u [B, L-1], sample_u [B] uniforms in [0, 1) -> accepted, tokens, counts. Vectorised, float64."""
    p, q = p.double(), q.double()
    lengths = _lengths(draft, draft_lengths)
    n = draft.shape[1]
    rows = torch.arange(draft.shape[0], device=draft.device)
    if n:
        ids = draft.clamp(min=0)[..., None]  # drafts past a block's length may hold any value
        p_d = p[:, :n].gather(2, ids).squeeze(2)
        q_d = q.gather(2, ids).squeeze(2)
        keep = (q_d <= 0) | (accept_u.double() < p_d / q_d.clamp(min=torch.finfo(torch.float64).tiny))
        inside = torch.arange(n, device=draft.device) < lengths[:, None]
        accepted = _first_or(inside & ~keep, lengths)
        rejected = accepted < lengths
        residual = (p[rows, accepted] - q[rows, accepted.clamp(max=n - 1)]).clamp(min=0)
        use_residual = rejected & (residual.sum(dim=1) > 0)
        weights = torch.where(use_residual[:, None], residual, p[rows, accepted])
    else:
        accepted = lengths.new_zeros(draft.shape[0])
        weights = p[:, 0]
    return _emit(draft, accepted, inverse_cdf(weights, sample_u), eos_id, p.shape[1])


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def verify_kernel(
        draft_ptr,
        lengths_ptr,
        ar_ptr,
        p_ptr,
        q_ptr,
        accept_u_ptr,
        sample_u_ptr,
        accepted_ptr,
        tokens_ptr,
        counts_ptr,
        stride_draft,
        stride_ar,
        stride_pb,
        stride_pl,
        stride_qb,
        stride_ql,
        stride_u,
        width,
        vocab,
        eos_id,
        SAMPLED: tl.constexpr,
        HAS_LENGTHS: tl.constexpr,
        BLOCK_L: tl.constexpr,
        BLOCK_V: tl.constexpr,
    ):
        b = tl.program_id(0).to(tl.int64)
        pos = tl.arange(0, BLOCK_L)
        if HAS_LENGTHS:
            n = tl.load(lengths_ptr + b).to(tl.int32)
        else:
            n = width - 1
        live = pos < n
        d = tl.load(draft_ptr + b * stride_draft + pos, mask=live, other=-1)
        if SAMPLED:
            p_d = tl.load(p_ptr + b * stride_pb + pos * stride_pl + d, mask=live, other=0.0).to(tl.float32)
            q_d = tl.load(q_ptr + b * stride_qb + pos * stride_ql + d, mask=live, other=0.0).to(tl.float32)
            u = tl.load(accept_u_ptr + b * stride_u + pos, mask=live, other=0.0).to(tl.float32)
            reject = live & (q_d > 0) & (u >= p_d / tl.where(q_d > 0, q_d, 1.0))
            a = tl.min(tl.where(reject, pos, n), axis=0)
            # draw at position a: from (p_a - q_a)+ after a rejection (p_a if that is all zero), else p_a
            rejected = a < n
            p_row = p_ptr + b * stride_pb + a * stride_pl
            q_row = q_ptr + b * stride_qb + a * stride_ql
            cols = tl.arange(0, BLOCK_V)
            # q_a's bound is 0 where it is not needed (the interpreter rejects block & scalar masks)
            q_bound = tl.where(rejected, vocab, 0)
            residual_total = tl.full((), 0.0, tl.float32)
            p_total = tl.full((), 0.0, tl.float32)
            for start in range(0, vocab, BLOCK_V):
                idx = start + cols
                p_a = tl.load(p_row + idx, mask=idx < vocab, other=0.0).to(tl.float32)
                q_a = tl.load(q_row + idx, mask=idx < q_bound, other=0.0).to(tl.float32)
                residual_total += tl.sum(tl.maximum(p_a - q_a, 0.0), axis=0)
                p_total += tl.sum(p_a, axis=0)
            use_residual = rejected & (residual_total > 0)
            target = tl.load(sample_u_ptr + b).to(tl.float32) * tl.where(use_residual, residual_total, p_total)
            q_bound = tl.where(use_residual, vocab, 0)
            running = tl.full((), 0.0, tl.float32)
            first_hit = tl.full((), vocab, tl.int32)
            last_positive = tl.full((), -1, tl.int32)
            for start in range(0, vocab, BLOCK_V):
                idx = start + cols
                p_a = tl.load(p_row + idx, mask=idx < vocab, other=0.0).to(tl.float32)
                q_a = tl.load(q_row + idx, mask=idx < q_bound, other=0.0).to(tl.float32)
                w = tl.where(use_residual, tl.maximum(p_a - q_a, 0.0), p_a)
                cumulative = running + tl.cumsum(w, axis=0)
                first_hit = tl.minimum(first_hit, tl.min(tl.where(cumulative > target, idx, vocab), axis=0))
                last_positive = tl.maximum(last_positive, tl.max(tl.where(w > 0, idx, -1), axis=0))
                running += tl.sum(w, axis=0)
            nxt = tl.where(first_hit < vocab, first_hit, last_positive).to(tl.int64)
        else:
            ar = tl.load(ar_ptr + b * stride_ar + pos, mask=live, other=-1)
            a = tl.min(tl.where(live & (d != ar), pos, n), axis=0)
            nxt = tl.load(ar_ptr + b * stride_ar + a).to(tl.int64)
        # emit d[:a] + [nxt], cut after the first EOS
        out = tl.where(pos < a, d.to(tl.int64), nxt)
        first_eos = tl.min(tl.where((pos <= a) & (out == eos_id), pos, BLOCK_L), axis=0)
        count = tl.minimum(a, first_eos) + 1
        tl.store(tokens_ptr + b * width + pos, tl.where(pos < count, out, -1), mask=pos < width)
        tl.store(accepted_ptr + b, a.to(tl.int64))
        tl.store(counts_ptr + b, count.to(tl.int64))

    return verify_kernel


def _launch(
    draft: torch.Tensor,
    width: int,
    eos_id: int | None,
    draft_lengths: torch.Tensor | None,
    ar: torch.Tensor | None = None,
    sampled: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    import triton

    batch = draft.shape[0]
    if draft.shape[1] != width - 1:
        raise ValueError(f"draft has {draft.shape[1]} positions, expected {width - 1}")
    device = draft.device
    accepted = torch.empty(batch, dtype=torch.int64, device=device)
    tokens = torch.empty((batch, width), dtype=torch.int64, device=device)
    counts = torch.empty(batch, dtype=torch.int64, device=device)
    if not batch:
        return accepted, tokens, counts
    draft = draft.contiguous()
    if sampled is None:
        ar = ar.contiguous()
        p = q = accept_u = sample_u = draft  # unused pointers
        vocab = 1
    else:
        p, q, accept_u, sample_u = (t.contiguous() for t in sampled)
        vocab = p.shape[-1]
    _kernel()[(batch,)](
        draft,
        draft_lengths.contiguous() if draft_lengths is not None else draft,
        ar if ar is not None else draft,
        p,
        q,
        accept_u,
        sample_u,
        accepted,
        tokens,
        counts,
        draft.stride(0),
        ar.stride(0) if ar is not None else 0,
        p.stride(0),
        p.stride(1),
        q.stride(0),
        q.stride(1),
        accept_u.stride(0),
        width,
        vocab,
        -1 if eos_id is None else eos_id,
        SAMPLED=sampled is not None,
        HAS_LENGTHS=draft_lengths is not None,
        BLOCK_L=triton.next_power_of_2(width),
        BLOCK_V=min(triton.next_power_of_2(vocab), 4096),
    )
    return accepted, tokens, counts


def verify_accept_triton(
    draft: torch.Tensor, ar: torch.Tensor, eos_id: int | None, draft_lengths: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Same contract as :func:`verify_accept_reference`: one launch, one program per block."""
    return _launch(draft, ar.shape[1], eos_id, draft_lengths, ar=ar)


def verify_accept_sampled_triton(
    draft: torch.Tensor,
    p: torch.Tensor,
    q: torch.Tensor,
    accept_u: torch.Tensor,
    sample_u: torch.Tensor,
    eos_id: int | None,
    draft_lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Same contract as :func:`verify_accept_sampled_reference`: one launch, one program per block."""
    return _launch(draft, p.shape[1], eos_id, draft_lengths, sampled=(p, q, accept_u, sample_u))
