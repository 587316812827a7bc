"""Per-row confidence and choice over the vocabulary, and the diffusion unmask rule built on them.

A diffusion step (``models.modes.diffusion``, temperature 0) takes, for every slot of a block,
the argmax of the logits with the mask token excluded and its probability under the softmax of
the full row, then commits the most confident masked slot plus every masked slot whose
probability reaches the threshold. Here both steps run on the device for a whole batch of
blocks, with no host synchronisation: one program per row for the statistics, one per block for
the commit. The commit also runs alone (``unmask_commit``) on candidates chosen elsewhere, as the
sampled diffusion step does; each block may have its own threshold (requests differ).

Ties: the lowest index wins, like ``torch.argmax`` (among equal logits for the token, among equal
confidences for the slot). NaN logits are not supported (``tl.argmax`` treats them unlike torch).
The reference computes probabilities in float64 (as the diffusion mode does) and returns fp32,
the kernel computes them in fp32: a confidence within ~1e-6 of the threshold may fall either side.
"""

from __future__ import annotations

import functools

import torch

from kernels import native as native_kernels

MAX_BLOCK_V = 4096
ARGMAX_CHUNK = 64


def row_argmax(x: torch.Tensor, native: bool = False) -> torch.Tensor:
    """``x.argmax(dim=-1)`` (same result: ties to the lowest index, the first NaN), faster on CPU.

    ``native`` (the fast path): one call of ``csrc/row_stats.c`` where it can read the rows (CPU,
    fp32 or bf16, two dimensions, each row contiguous). Otherwise, PyTorch's CPU argmax over a
    4096-wide row is scalar code, several times slower than a max; the row is cut into chunks of
    ``ARGMAX_CHUNK``, the first chunk holding the row's maximum is found from the chunks' maxima, and
    the argmax runs only inside it. Rows whose width the chunk does not divide, and small batches
    (where the extra calls cost more), take ``torch.argmax``.
    """
    if native and _native_reads(x):
        out = torch.empty(x.shape[0], dtype=torch.int64)
        _native_rows("row_argmax", x, out.data_ptr())
        return out
    width = x.shape[-1]
    if x.dim() < 2 or x.numel() < 8 * width or width % ARGMAX_CHUNK or x.is_cuda:
        return x.argmax(dim=-1)
    rows = x.reshape(-1, width // ARGMAX_CHUNK, ARGMAX_CHUNK)
    chunk = rows.amax(dim=-1).argmax(dim=-1)
    inside = rows[torch.arange(rows.shape[0], device=x.device), chunk].argmax(dim=-1)
    return (chunk * ARGMAX_CHUNK + inside).view(x.shape[:-1])


def row_top2_native(x: torch.Tensor, exclude: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Per row of ``x`` [R, V] with index ``exclude`` left out: the indices [R, 2] of its largest and
    second largest values (ties to the lower index; the first is ``row_argmax``'s) and their
    probabilities [R, 2] under the row's fp32 softmax, in one call of ``csrc/row_stats.c``; None where
    that cannot read the rows. What a greedy draft needs to guess the verify's outcomes: torch's topk
    sorts, and with a softmax costs some 5 us a row."""
    if not _native_reads(x):
        return None
    index = torch.empty((x.shape[0], 2), dtype=torch.int64)
    prob = torch.empty((x.shape[0], 2), dtype=torch.float32)
    _native_rows("row_top2", x, exclude, index.data_ptr(), prob.data_ptr())
    return index, prob


def row_confidence_native(x: torch.Tensor, exclude: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``row_stats_reference(x, exclude)`` for [R, V] rows in one call of ``csrc/row_stats.c``: each row's
    argmax without ``exclude`` and its probability under the row's whole softmax, in float64 rounded to
    fp32 (the sums in another order: equal to the reference's fp32 result unless that lies within about
    1e-16 of a rounding boundary); None where the kernel cannot read the rows. A greedy diffusion pass
    compares these with its threshold; torch's float64 softmax and gather cost some 10 us a row."""
    if not _native_reads(x):
        return None
    prob = torch.empty(x.shape[0], dtype=torch.float32)
    token = torch.empty(x.shape[0], dtype=torch.int64)
    _native_rows("row_confidence", x, exclude, token.data_ptr(), prob.data_ptr())
    return prob, token


def _native_reads(x: torch.Tensor) -> bool:
    """Whether the native row kernels can read ``x``: CPU rows of fp32 or bf16, each contiguous."""
    return x.dim() == 2 and x.stride(1) == 1 and native_kernels.serves(x)


def _native_rows(name: str, x: torch.Tensor, *outputs) -> None:
    """Call the row kernel ``name`` of ``csrc/row_stats.c`` on the rows of ``x`` (``_native_reads``),
    with its own arguments after the rows'."""
    kernel = getattr(native_kernels.library(), name)
    kernel(x.data_ptr(), x.shape[0], x.shape[1], x.stride(0), native_kernels.DTYPES[x.dtype], *outputs)


def row_stats_reference(logits: torch.Tensor, exclude_id: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [..., V] -> (probability [...] fp32, token [...] int64): the argmax over V without
    ``exclude_id`` (None: no exclusion) and its softmax probability over the whole row."""
    allowed = logits
    if exclude_id is not None:
        allowed = logits.clone()
        allowed[..., exclude_id] = float("-inf")
    # in the logits' own dtype: widening to float64 is exact and keeps the order, so it is the same argmax
    token = row_argmax(allowed)
    prob = torch.softmax(logits.double(), dim=-1).gather(-1, token.unsqueeze(-1)).squeeze(-1)
    return prob.float(), token


def block_thresholds(threshold: float | torch.Tensor | None, batch: int, device: torch.device) -> torch.Tensor:
    """Per-block thresholds [B] fp32 from one value or a tensor; None (no threshold) becomes +inf."""
    if isinstance(threshold, torch.Tensor):
        return threshold.to(device=device, dtype=torch.float32).expand(batch)
    value = float("inf") if threshold is None else threshold
    return torch.full((batch,), value, dtype=torch.float32, device=device)


def unmask_commit_reference(
    blocks: torch.Tensor,
    prob: torch.Tensor,
    token: torch.Tensor,
    mask_id: int,
    threshold: float | torch.Tensor | None,
    min_count: torch.Tensor | None = None,
) -> torch.Tensor:
    """Commit, in place in ``blocks`` [B, L], the candidate ``token`` [B, L] of the most confident masked slots.

    ``prob`` [B, L] is each slot's confidence. Per block, ``count = max(1, #masked slots with
    confidence >= threshold, min_count)`` (threshold: one value, or [B]; None or +inf: no slot
    qualifies; min_count [B] carries a step schedule), at most the number of masked slots; the
    ``count`` most confident masked slots are committed. Ragged blocks: pad them with any id other
    than ``mask_id``; padding is never committed. Returns the committed slots as a bool [B, L].
    """
    thresholds = block_thresholds(threshold, blocks.shape[0], blocks.device)
    masked = blocks == mask_id
    conf = torch.where(masked, prob, torch.full_like(prob, -1.0))
    count = (masked & (prob >= thresholds[:, None])).sum(dim=1).clamp(min=1)
    if min_count is not None:
        count = torch.maximum(count, min_count.to(count.dtype))
    count = torch.minimum(count, masked.sum(dim=1))
    order = torch.sort(conf, dim=1, descending=True, stable=True).indices
    ranks = torch.arange(blocks.shape[1], device=blocks.device).expand_as(order).contiguous()
    rank = torch.empty_like(order).scatter_(1, order, ranks)
    committed = masked & (rank < count[:, None])
    blocks.copy_(torch.where(committed, token, blocks))
    return committed


def unmask_reference(
    blocks: torch.Tensor,
    logits: torch.Tensor,
    mask_id: int,
    threshold: float | torch.Tensor | None,
    min_count: torch.Tensor | None = None,
) -> torch.Tensor:
    """The greedy diffusion step: ``unmask_commit_reference`` of each slot's argmax (mask token
    excluded) and its probability; logits [B, L, V]. Only masked slots are scored (a row's statistics
    do not depend on the other rows): nothing reads a decided slot's."""
    masked = blocks == mask_id
    scored = row_stats_reference(logits[masked], mask_id)
    prob = torch.zeros(blocks.shape, dtype=torch.float32, device=blocks.device).masked_scatter_(masked, scored[0])
    token = blocks.masked_scatter(masked, scored[1])
    return unmask_commit_reference(blocks, prob, token, mask_id, threshold, min_count)


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
        threshold_ptr,
        committed_ptr,
        stride_block,
        length,
        mask_id,
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
        threshold = tl.load(threshold_ptr + b)
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


def unmask_commit_triton(
    blocks: torch.Tensor,
    prob: torch.Tensor,
    token: torch.Tensor,
    mask_id: int,
    threshold: float | torch.Tensor | None,
    min_count: torch.Tensor | None = None,
) -> torch.Tensor:
    """Same contract as :func:`unmask_commit_reference`: one launch, no host synchronisation."""
    import triton

    batch, length = blocks.shape
    if prob.shape != (batch, length) or token.shape != (batch, length):
        raise ValueError(f"candidates {tuple(prob.shape)} do not match blocks {tuple(blocks.shape)}")
    if blocks.stride(-1) != 1:
        raise ValueError("blocks must have a contiguous last dimension (they are updated in place)")
    committed = torch.empty((batch, length), dtype=torch.bool, device=blocks.device)
    if batch:
        _, commit_kernel = _kernels()
        commit_kernel[(batch,)](
            blocks,
            prob.contiguous(),
            token.contiguous(),
            min_count if min_count is not None else blocks,
            block_thresholds(threshold, batch, blocks.device).contiguous(),
            committed,
            blocks.stride(0),
            length,
            mask_id,
            HAS_MIN_COUNT=min_count is not None,
            BLOCK_L=triton.next_power_of_2(length),
        )
    return committed


def unmask_triton(
    blocks: torch.Tensor,
    logits: torch.Tensor,
    mask_id: int,
    threshold: float | torch.Tensor | None,
    min_count: torch.Tensor | None = None,
) -> torch.Tensor:
    """Same contract as :func:`unmask_reference`: two launches, no host synchronisation."""
    if logits.shape[:2] != tuple(blocks.shape):
        raise ValueError(f"logits {tuple(logits.shape)} do not match blocks {tuple(blocks.shape)}")
    prob, token = row_stats_triton(logits, mask_id)
    return unmask_commit_triton(blocks, prob, token, mask_id, threshold, min_count)
