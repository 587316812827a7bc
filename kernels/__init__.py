"""Hot-pass kernels, each a PyTorch reference plus (on CUDA) a Triton implementation.

One dispatch point per kernel: Triton on CUDA devices, the reference elsewhere;
``TRISERVE_KERNELS=triton|torch`` (read at import) forces either (``triton`` on CPU needs
``TRITON_INTERPRET=1``). On a CPU, attention, RMSNorm and RoPE also have native C kernels
(kernels/native.py), taken where the caller passes ``native`` (the model does on its fast path).
"""

from __future__ import annotations

import os

import torch

from kernels.cpu_attention import segment_attention_native
from kernels.kv_write import kv_write_reference
from kernels.masks import MaskKind, segment_mask
from kernels.matmul import matmul_reference
from kernels.rmsnorm import rmsnorm_native, rmsnorm_reference
from kernels.rope import rope_native, rope_reference
from kernels.row_stats import unmask_commit_reference, unmask_reference
from kernels.segment_attention import AttentionMetadata, AttentionSegment, segment_attention_reference
from kernels.verify_accept import verify_accept_reference, verify_accept_sampled_reference

__all__ = [
    "AttentionMetadata",
    "AttentionSegment",
    "MaskKind",
    "backend",
    "kv_write",
    "linear",
    "rms_norm",
    "rope",
    "segment_attention",
    "segment_mask",
    "unmask",
    "unmask_commit",
    "verify_accept",
    "verify_accept_sampled",
]


def _parse_forced(value: str) -> str | None:
    forced = value.strip().lower()
    if forced and forced not in ("triton", "torch"):
        raise ValueError(f"TRISERVE_KERNELS must be 'triton' or 'torch', not {forced!r}")
    return forced or None


# read once: the dispatch runs dozens of times per forward and an environment lookup costs about
# as much as a small tensor operation; tests switch backends by setting this attribute
FORCED: str | None = _parse_forced(os.environ.get("TRISERVE_KERNELS", ""))


def backend(device: torch.device) -> str:
    """Which implementation runs for tensors on ``device``: 'triton' or 'torch'."""
    return FORCED or ("triton" if device.type == "cuda" else "torch")


def _triton_for(x: torch.Tensor) -> bool:
    """Triton serves inference only: a tensor that needs gradients (training) takes the reference."""
    return backend(x.device) == "triton" and not (torch.is_grad_enabled() and x.requires_grad)


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Batch-invariant ``x @ weight.T`` (a row rounds the same in any batch); see kernels.matmul.

    CUDA only for Triton: the interpreter's dot goes to BLAS, whose rounding depends on the tile's
    shape, so on a CPU the reference (invariant by construction) serves even when Triton is forced."""
    if x.is_cuda and _triton_for(x):
        from kernels.matmul import matmul_triton

        return matmul_triton(x, weight)
    return matmul_reference(x, weight)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, native: bool = False) -> torch.Tensor:
    """RMSNorm computed in fp32, one row at a time; see kernels.rmsnorm. ``native``: on the CPU, the
    compiled kernel wherever it takes the call."""
    if _triton_for(x):
        from kernels.rmsnorm import rmsnorm_triton

        return rmsnorm_triton(x, weight, eps)
    if native and (out := rmsnorm_native(x, weight, eps)) is not None:
        return out
    return rmsnorm_reference(x, weight, eps)


def rope(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    q_scale: torch.Tensor | None,
    native: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate-half RoPE of queries (times the Llama-4 scale) and keys; see kernels.rope. ``native``: on
    the CPU, the compiled kernel wherever it takes the call."""
    if _triton_for(q):
        from kernels.rope import rope_triton

        return rope_triton(q, k, cos, sin, q_scale)
    if native and (out := rope_native(q, k, cos, sin, q_scale)) is not None:
        return out
    return rope_reference(q, k, cos, sin, q_scale)


def segment_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    native: bool = False,
) -> torch.Tensor:
    """Attention of packed segments over the paged cache; see kernels.segment_attention. ``native``: on
    the CPU, the compiled kernel (kernels.cpu_attention) wherever it takes the call."""
    if _triton_for(q):
        from kernels.triton_segment_attention import segment_attention_triton

        # on CPU (interpreter) tl.dot goes to BLAS, whose rounding depends on a row's tile position
        return segment_attention_triton(q, k, v, k_cache, v_cache, meta, scale, use_dot=q.is_cuda)
    if native and (out := segment_attention_native(q, k, v, k_cache, v_cache, meta, scale)) is not None:
        return out
    return segment_attention_reference(q, k, v, k_cache, v_cache, meta, scale)


def kv_write(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rows: torch.Tensor,
    slots: torch.Tensor,
) -> None:
    """Store the committed rows' keys/values in their cache slots, in place; see kernels.kv_write."""
    if _triton_for(k):
        from kernels.kv_write import kv_write_triton

        return kv_write_triton(k_cache, v_cache, k, v, rows, slots)
    return kv_write_reference(k_cache, v_cache, k, v, rows, slots)


def unmask(
    blocks: torch.Tensor,
    logits: torch.Tensor,
    mask_id: int,
    threshold: float | torch.Tensor | None,
    min_count: torch.Tensor | None = None,
) -> torch.Tensor:
    """Greedy diffusion step on a batch of blocks, in place; returns the committed slots. See kernels.row_stats."""
    if _triton_for(logits):
        from kernels.row_stats import unmask_triton

        return unmask_triton(blocks, logits, mask_id, threshold, min_count)
    return unmask_reference(blocks, logits, mask_id, threshold, min_count)


def unmask_commit(
    blocks: torch.Tensor,
    prob: torch.Tensor,
    token: torch.Tensor,
    mask_id: int,
    threshold: float | torch.Tensor | None,
    min_count: torch.Tensor | None = None,
) -> torch.Tensor:
    """The commit half of ``unmask`` for candidates chosen elsewhere (sampled ones), in place."""
    if _triton_for(prob):
        from kernels.row_stats import unmask_commit_triton

        return unmask_commit_triton(blocks, prob, token, mask_id, threshold, min_count)
    return unmask_commit_reference(blocks, prob, token, mask_id, threshold, min_count)


def verify_accept(
    draft: torch.Tensor, ar: torch.Tensor, eos_id: int | None, draft_lengths: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Greedy acceptance of verified blocks: (accepted, tokens, counts); see kernels.verify_accept."""
    if _triton_for(ar):
        from kernels.verify_accept import verify_accept_triton

        return verify_accept_triton(draft, ar, eos_id, draft_lengths)
    return verify_accept_reference(draft, ar, eos_id, draft_lengths)


def verify_accept_sampled(
    draft: torch.Tensor,
    p: torch.Tensor,
    q: torch.Tensor,
    accept_u: torch.Tensor,
    sample_u: torch.Tensor,
    eos_id: int | None,
    draft_lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Speculative rejection sampling of verified blocks (temperature > 0); see kernels.verify_accept."""
    if _triton_for(p):
        from kernels.verify_accept import verify_accept_sampled_triton

        return verify_accept_sampled_triton(draft, p, q, accept_u, sample_u, eos_id, draft_lengths)
    return verify_accept_sampled_reference(draft, p, q, accept_u, sample_u, eos_id, draft_lengths)
