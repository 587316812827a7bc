"""Building blocks of the Ministral-3 decoder: RMSNorm, YaRN RoPE, Llama-4 query scaling, SwiGLU.

Numerics follow the reference implementation (RMSNorm in fp32, cos/sin from fp32 frequencies);
matrix products (``models.matmul``) give a row the same result however many rows share it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

import kernels
from models import matmul
from models.config import RopeConfig
from models.matmul import linear


def identity(x: torch.Tensor) -> torch.Tensor:
    """The reduction of a row-parallel output on a single rank (tensor parallelism swaps it)."""
    return x


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.rms_norm(x, self.weight, self.eps, native=matmul.fast_path_on())


def yarn_inverse_frequencies(rope: RopeConfig, head_dim: int) -> torch.Tensor:
    """Per-pair inverse frequencies: plain RoPE, or YaRN's blend of interpolation and extrapolation."""
    # built on the CPU explicitly: models are constructed under a "meta" default device
    pos_freqs = rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device="cpu") / head_dim)
    extrapolation = 1.0 / pos_freqs
    if rope.rope_type != "yarn":
        return extrapolation
    interpolation = 1.0 / (rope.factor * pos_freqs)
    original = rope.original_max_position_embeddings

    def correction_dim(rotations: float) -> float:
        return (head_dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(rope.theta))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    extrapolation_weight = 1 - ramp
    return interpolation * (1 - extrapolation_weight) + extrapolation * extrapolation_weight


class Rotary(nn.Module):
    """cos/sin for arbitrary (packed, non-contiguous) positions, plus the Llama-4 query scale."""

    def __init__(self, rope: RopeConfig, head_dim: int) -> None:
        super().__init__()
        self.inv_freq = yarn_inverse_frequencies(rope, head_dim)  # not a buffer: never in checkpoints
        self.attention_factor = rope.yarn_attention_factor
        self.beta = rope.llama_4_scaling_beta
        self.original_max = rope.original_max_position_embeddings
        self._table: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None

    def forward(
        self, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """positions [T] -> cos, sin [T, 1, D] and query scale [T, 1, 1], in ``dtype``; the scale is
        None for a model without Llama-4 query scaling (a product with 1 would change no bit)."""
        if self.inv_freq.device != positions.device:
            self.inv_freq = self.inv_freq.to(positions.device)
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)
        cos = (emb.cos() * self.attention_factor).to(dtype)[:, None, :]
        sin = (emb.sin() * self.attention_factor).to(dtype)[:, None, :]
        if self.beta is None or self.original_max is None:
            return cos, sin, None
        scale = (1 + self.beta * torch.log(1 + torch.floor(positions.float() / self.original_max))).to(dtype)
        return cos, sin, scale[:, None, None]

    def lookup(
        self, positions: torch.Tensor, dtype: torch.dtype, upto: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``forward(positions, dtype)`` read from a table of every position below ``upto`` (or more).

        The table is ``forward`` of consecutive positions, so each row is bit-identical to computing
        it directly; it grows to the next power of two when a step reaches past it, which keeps it
        small for long-context models that serve short requests."""
        table = self._table
        if table is None or table[0].shape[0] < upto or table[0].dtype != dtype or table[0].device != positions.device:
            size = max(upto, table[0].shape[0] if table is not None else 0, 64)
            size = 1 << (size - 1).bit_length()
            table = self._table = self(torch.arange(size, device=positions.device), dtype)
        cos, sin, scale = table
        scale = None if scale is None else scale.index_select(0, positions)
        return cos.index_select(0, positions), sin.index_select(0, positions), scale


@dataclass
class LoraWeights:
    """A low-rank update of one projection, applied to draft tokens only: ``out += scale * B(A(x))``.

    The factors are fp32 and the update is computed and added in fp32, then rounded to ``out``'s
    dtype, as PEFT does by default for a bf16 or fp16 base model (``autocast_adapter_dtype``). Where
    drafts use merged weights instead (``merge_drafts``), ``merged`` gives the projection's weight with
    the update folded in."""

    a: torch.Tensor  # [r, in]
    b: torch.Tensor  # [out, r]
    scale: float
    _merged: tuple[tuple[int, ...], torch.Tensor] | None = field(default=None, repr=False, compare=False)

    def apply(self, out: torch.Tensor, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """``out`` with the update added on ``rows`` (the draft rows), from those rows of ``x``. When
        every row is a draft row no row is gathered or scattered; each row's result is the same either way."""
        every_row = rows.numel() == x.shape[0]
        inputs = x if every_row else x.index_select(0, rows)
        delta = linear(linear(inputs.float(), self.a), self.b).mul_(self.scale)
        if every_row:
            return delta.add_(out).to(out.dtype)
        return out.index_copy(0, rows, delta.add_(out.index_select(0, rows)).to(out.dtype))

    def merged(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight + scale * B A`` (computed in fp32, rounded once to ``weight``'s dtype), kept and rebuilt
        when the weight or a factor changes."""
        key = matmul.fingerprint((weight, self.a, self.b))
        if self._merged is None or self._merged[0] != key:
            self._merged = (key, (weight.float() + self.scale * (self.b @ self.a)).to(weight.dtype))
        return self._merged[1]


def merge_drafts(x: torch.Tensor) -> bool:
    """Whether draft rows multiply ``LoraWeights.merged`` weights (one product per projection) rather than
    the base weight plus the update (two more products and four small operations per projection).
    On a CPU those small operations cost more than the products (a bundled-model draft of 32 rows: 6.5
    ms with the update against 4.8 for a verify of the same rows); the merged weights cost a second
    copy of every adapted projection, which a GPU, where the update is cheap, does not pay. Inference on
    the fast path only: training differentiates the factors."""
    return matmul.fast_path_on() and x.device.type == "cpu"


def adapted_linear(
    x: torch.Tensor, weights: tuple[torch.Tensor, ...], loras: tuple[LoraWeights | None, ...], rows: torch.Tensor | None
) -> torch.Tensor:
    """``linear(x, *weights)`` with each weight's draft adapter (None: none) on ``rows`` (None: no row).

    Merged (``merge_drafts``): draft rows multiply the merged weights, so a row's result does not depend
    on the other rows of the call; a call of draft rows only runs no base product."""
    if rows is None or not any(loras):
        return linear(x, *weights)
    if merge_drafts(x):
        drafts = [w if lora is None else lora.merged(w) for w, lora in zip(weights, loras)]
        if rows.numel() == x.shape[0]:
            return linear(x, *drafts)
        return linear(x, *weights).index_copy(0, rows, linear(x.index_select(0, rows), *drafts))
    out = linear(x, *weights)
    if len(weights) == 1:
        return loras[0].apply(out, x, rows)
    parts = out.split_with_sizes([w.shape[0] for w in weights], -1)
    return torch.cat([part if lora is None else lora.apply(part, x, rows) for part, lora in zip(parts, loras)], -1)


class SwiGLU(nn.Module):
    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)
        self.reduce = identity
        self.lora: dict[str, LoraWeights] = {}  # a draft adapter's LoraWeights by projection ("gate_proj", ...)

    def forward(self, x: torch.Tensor, adapter_rows: torch.Tensor | None = None) -> torch.Tensor:
        """``adapter_rows``: the rows a draft adapter applies to (None: none)."""
        width = self.up_proj.out_features
        gate_up = (self.gate_proj.weight, self.up_proj.weight)
        loras = (self.lora.get("gate_proj"), self.lora.get("up_proj"))
        gate, up = adapted_linear(x, gate_up, loras, adapter_rows).split_with_sizes([width, width], -1)
        hidden = F.silu(gate) * up
        return adapted_linear(hidden, (self.down_proj.weight,), (self.lora.get("down_proj"),), adapter_rows)
