"""Per-row confidence and choice over the vocabulary, and the diffusion unmask rule built on them.

A diffusion step (``models.modes.diffusion``, temperature 0) takes, for every slot of a block,
the argmax of the logits with the mask token excluded and its probability under the softmax of
the full row, then commits the most confident masked slot plus every masked slot whose
probability reaches the threshold. Here both steps run on the device for a whole batch of
blocks, with no host synchronisation: one program per row for the statistics, one per block for
the commit.

Ties: the lowest index wins, like ``torch.argmax`` (among equal logits for the token, among equal
confidences for the slot). NaN logits are not supported (``tl.argmax`` treats them unlike torch).
The reference computes probabilities in float64 (as the diffusion mode does) and returns fp32,
the kernel computes them in fp32: a confidence within ~1e-6 of the threshold may fall either side.
"""

from __future__ import annotations

import functools

import torch

MAX_BLOCK_V = 4096


def row_stats_reference(logits: torch.Tensor, exclude_id: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [..., V] -> (probability [...] fp32, token [...] int64): the argmax over V without
    ``exclude_id`` (None: no exclusion) and its softmax probability over the whole row."""
    wide = logits.double()
    allowed = wide.clone()
    if exclude_id is not None:
        allowed[..., exclude_id] = float("-inf")
    token = allowed.argmax(dim=-1)
    prob = torch.softmax(wide, dim=-1).gather(-1, token.unsqueeze(-1)).squeeze(-1)
    return prob.float(), token


def unmask_reference(
    blocks: torch.Tensor,
    logits: torch.Tensor,
    mask_id: int,
    threshold: float | None,
    min_count: torch.Tensor | None = None,
) -> torch.Tensor:
    """Commit, in place in ``blocks`` [B, L], the argmax token of the most confident masked slots.

    logits [B, L, V]. Per block, ``count = max(1, #masked slots with confidence >= threshold,
    min_count)`` (threshold None: no slot qualifies; min_count [B] carries a step schedule), at
    most the number of masked slots; the ``count`` most confident masked slots are committed.
    Ragged blocks: pad them with any id other than ``mask_id``; padding is never committed.
    Returns the committed slots as a bool [B, L].
    """
    prob, token = row_stats_reference(logits, mask_id)
    masked = blocks == mask_id
    conf = torch.where(masked, prob, torch.full_like(prob, -1.0))
    qualified = (masked & (prob >= threshold)).sum(dim=1) if threshold is not None else torch.zeros_like(blocks[:, 0])
    count = qualified.clamp(min=1)
    if min_count is not None:
        count = torch.maximum(count, min_count.to(count.dtype))
    count = torch.minimum(count, masked.sum(dim=1))
    order = torch.sort(conf, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(blocks.shape[1]).expand_as(order).contiguous())
    committed = masked & (rank < count[:, None])
    blocks.copy_(torch.where(committed, token, blocks))
    return committed


@functools.cache
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def row_stats_kernel(logits_ptr, prob_ptr, token_ptr, stride_row, vocab, exclude_id, BLOCK_V: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        base = logits_ptr + row * stride_row
        cols = tl.arange(0, BLOCK_V)
        run_max = tl.full((), -3.0e38, tl.float32)  # finite: exp(x - run_max) stays defined
        run_sum = tl.full((), 0.0, tl.float32)
        best = tl.full((), float("-inf"), tl.float32)
        best_idx = tl.full((), 0, tl.int32)
        for start in range(0, vocab, BLOCK_V):
            idx = start + cols
            x = tl.load(base + idx, mask=idx < vocab, other=float("-inf")).to(tl.float32)
            new_max = tl.maximum(run_max, tl.max(x, axis=0))
            run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(x - new_max), axis=0)
            run_max = new_max
            allowed = tl.where(idx == exclude_id, float("-inf"), x)
            chunk_best = tl.max(allowed, axis=0)
            chunk_idx = start + tl.argmax(allowed, axis=0, tie_break_left=True)
            better = chunk_best > best  # strict: an earlier chunk keeps a tie
            best_idx = tl.where(better, chunk_idx, best_idx)
            best = tl.where(better, chunk_best, best)
        tl.store(prob_ptr + row, tl.exp(best - run_max) / run_sum)
        tl.store(token_ptr + row, best_idx.to(tl.int64))

    @triton.jit
    def commit_kernel(
        blocks_ptr,
        prob_ptr,
        token_ptr,
        min_count_ptr,
        committed_ptr,
        stride_block,
        length,
        mask_id,
        threshold,
        HAS_MIN_COUNT: tl.constexpr,
        BLOCK_L: tl.constexpr,
    ):
        b = tl.program_id(0).to(tl.int64)
        slots = tl.arange(0, BLOCK_L)
        inside = slots < length
        tokens = tl.load(blocks_ptr + b * stride_block + slots, mask=inside, other=0)
        masked = inside & (tokens == mask_id)
        prob = tl.load(prob_ptr + b * length + slots, mask=inside, other=0.0)
        conf = tl.where(masked, prob, -1.0)
        count = tl.maximum(tl.sum((masked & (prob >= threshold)).to(tl.int32), axis=0), 1)
        if HAS_MIN_COUNT:
            count = tl.maximum(count, tl.load(min_count_ptr + b).to(tl.int32))
        count = tl.minimum(count, tl.sum(masked.to(tl.int32), axis=0))
        # rank of slot i: masked slots more confident than i, or as confident and earlier
        ci = conf[:, None]
        cj = conf[None, :]
        ahead = (cj > ci) | ((cj == ci) & (slots[None, :] < slots[:, None]))
        rank = tl.sum((ahead & masked[None, :]).to(tl.int32), axis=1)
        commit = masked & (rank < count)
        choice = tl.load(token_ptr + b * length + slots, mask=inside, other=0)
        tl.store(blocks_ptr + b * stride_block + slots, tl.where(commit, choice, tokens), mask=inside)
        tl.store(committed_ptr + b * length + slots, commit, mask=inside)

    return row_stats_kernel, commit_kernel


def row_stats_triton(logits: torch.Tensor, exclude_id: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as :func:`row_stats_reference` (fp32 arithmetic; any float logits, upcast on load)."""
    import triton

    vocab = logits.shape[-1]
    rows = logits.reshape(-1, vocab)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    prob = torch.empty(rows.shape[0], dtype=torch.float32, device=logits.device)
    token = torch.empty(rows.shape[0], dtype=torch.int64, device=logits.device)
    if rows.shape[0]:
        row_stats_kernel, _ = _kernels()
        row_stats_kernel[(rows.shape[0],)](
            rows,
            prob,
            token,
            rows.stride(0),
            vocab,
            -1 if exclude_id is None else exclude_id,
            BLOCK_V=min(triton.next_power_of_2(vocab), MAX_BLOCK_V),
        )
    return prob.view(logits.shape[:-1]), token.view(logits.shape[:-1])


def unmask_triton(
    blocks: torch.Tensor,
    logits: torch.Tensor,
    mask_id: int,
    threshold: float | None,
    min_count: torch.Tensor | None = None,
) -> torch.Tensor:
    """Same contract as :func:`unmask_reference`: two launches, no host synchronisation."""
    import triton

    batch, length = blocks.shape
    if logits.shape[:2] != (batch, length):
        raise ValueError(f"logits {tuple(logits.shape)} do not match blocks {tuple(blocks.shape)}")
    if blocks.stride(-1) != 1:
        raise ValueError("blocks must have a contiguous last dimension (they are updated in place)")
    prob, token = row_stats_triton(logits, mask_id)
    committed = torch.empty((batch, length), dtype=torch.bool, device=blocks.device)
    if batch:
        _, commit_kernel = _kernels()
        commit_kernel[(batch,)](
            blocks,
            prob,
            token,
            min_count if min_count is not None else blocks,
            committed,
            blocks.stride(0),
            length,
            mask_id,
            float("inf") if threshold is None else threshold,
            HAS_MIN_COUNT=min_count is not None,
            BLOCK_L=triton.next_power_of_2(length),
        )
    return committed
