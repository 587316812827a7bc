"""The joint AR + block-diffusion training objective of the family (one forward, one head).

Input ``[noisy | clean]``, both halves at positions 0..N-1. Per sequence t ~ U(0, 1) and
p = (1 - eps) t + eps; every token of the noisy half is masked with probability p. Attention:
a noisy block sees itself bidirectionally and the clean blocks before it; the clean half is
causal; clean never sees noisy. The noisy half gives diffusion logits (same position), the clean
half AR logits (next token). Loss = w_dlm * sum_masked CE / p + w_ar * sum AR CE, divided by the
number of masked plus AR tokens.

Images (VLM): their embeddings replace the placeholder rows in both halves and those rows are never
masked. In the clean half the image is the causal prefix the caption reads, as in serving's prefill;
in the noisy half it is a clean, visible part of its block and of the blocks after it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from models.model import TriModeModel

MASK_EPS = 1e-3


def training_mask(length: int, block_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Boolean [2N, 2N] visibility (query, key) over ``[noisy | clean]``."""
    idx = torch.arange(length, device=device)
    block = idx // block_size
    noisy_noisy = block[:, None] == block[None, :]
    noisy_clean = block[None, :] < block[:, None]
    clean_clean = idx[None, :] <= idx[:, None]
    clean_noisy = torch.zeros(length, length, dtype=torch.bool, device=device)
    top = torch.cat([noisy_noisy, noisy_clean], dim=1)
    bottom = torch.cat([clean_noisy, clean_clean], dim=1)
    return torch.cat([top, bottom], dim=0)


@dataclass
class Noise:
    """The random part of a training example, drawn once so the loss is a pure function of it."""

    masked: torch.Tensor  # [B, N] bool
    p: torch.Tensor  # [B] mask probability per sequence


def draw_noise(
    batch: torch.Tensor,
    generator: torch.Generator | None = None,
    *,
    block_size: int | None = None,
    infill_fraction: float = 0.0,
) -> Noise:
    """Independent masking at a per-sequence rate p; with ``infill_fraction``, that share of the
    sequences is masked as infilling is decoded instead (``models.modes.infill``): in every block the
    first r positions, r ~ U{1..block_size - 1} per sequence, and p = r / block_size, so the masked
    span learns from the clean tokens after it in its block."""
    bsz, n = batch.shape
    t = torch.rand(bsz, generator=generator)
    p = (1 - MASK_EPS) * t + MASK_EPS
    masked = torch.rand(bsz, n, generator=generator) < p[:, None]
    if infill_fraction > 0:
        if block_size is None:
            raise ValueError("infill masking needs the block size")
        rows = torch.rand(bsz, generator=generator) < infill_fraction
        span = torch.randint(1, block_size, (bsz,), generator=generator)
        leading = (torch.arange(n) % block_size)[None, :] < span[:, None]
        masked = torch.where(rows[:, None], leading, masked)
        p = torch.where(rows, span / block_size, p)
    return Noise(masked=masked.to(batch.device), p=p.to(batch.device))


@dataclass
class LossParts:
    loss: torch.Tensor  # the normalised objective (differentiable)
    diffusion_sum: torch.Tensor  # sum over masked tokens of CE / p
    ar_sum: torch.Tensor  # sum of next-token CE
    masked_tokens: int
    ar_tokens: int


def joint_loss(
    model: TriModeModel,
    batch: torch.Tensor,
    noise: Noise,
    *,
    block_size: int,
    dlm_weight: float = 0.3,
    ar_weight: float = 1.0,
    input_embeds: torch.Tensor | None = None,
    embeds_mask: torch.Tensor | None = None,
    ar_rows: torch.Tensor | None = None,
) -> LossParts:
    """The objective on a batch of token ids [B, N]; optional image embeddings [B, N, H] on
    ``embeds_mask``; ``ar_rows`` [B] bool limits the AR term to those rows (self-distilled rows,
    the model's own output, train the diffusion term only)."""
    bsz, n = batch.shape
    mask_id = model.config.mask_token_id
    if embeds_mask is not None:
        noise = Noise(noise.masked & ~embeds_mask, noise.p)
        input_embeds, embeds_mask = input_embeds.repeat(1, 2, 1), embeds_mask.repeat(1, 2)
    noisy = torch.where(noise.masked, torch.full_like(batch, mask_id), batch)
    inputs = torch.cat([noisy, batch], dim=1)
    positions = torch.arange(n, device=batch.device).repeat(2)
    attn = training_mask(n, block_size, device=batch.device)
    logits = model.forward_dense(inputs, positions, attn, input_embeds=input_embeds, embeds_mask=embeds_mask)
    diff_logits, ar_logits = logits[:, :n], logits[:, n:]
    ce_masked = F.cross_entropy(diff_logits[noise.masked], batch[noise.masked], reduction="none")
    p_per_token = noise.p[:, None].expand(bsz, n)[noise.masked]
    diffusion_sum = (ce_masked / p_per_token).sum()
    if ar_rows is not None:
        ar_logits, batch = ar_logits[ar_rows], batch[ar_rows]
    ar_sum = F.cross_entropy(ar_logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")
    masked_tokens = int(noise.masked.sum())
    ar_tokens = len(batch) * (n - 1)
    loss = (dlm_weight * diffusion_sum + ar_weight * ar_sum) / (masked_tokens + ar_tokens)
    return LossParts(loss, diffusion_sum.detach(), ar_sum.detach(), masked_tokens, ar_tokens)
