"""The Pixtral-style vision encoder: patch convolution, RMSNorm, pre-norm blocks with a gated MLP
and 2D rotary embeddings over the patch grid.

Names follow the checkpoints (``patch_conv``, ``ln_pre``, ``transformer.layers.{i}.attention``,
``attention_norm``, ``feed_forward``, ``ffn_norm``) so ``vision_tower.*`` tensors map one to one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.layers import RMSNorm, SwiGLU
from vision.config import VisionConfig

_ACT = {"silu": F.silu, "gelu": F.gelu}


class GatedMLP(SwiGLU):
    """``down(act(gate(x)) * up(x))``; Pixtral configs choose the activation (SiLU in the released ones)."""

    def __init__(self, hidden: int, intermediate: int, act: str) -> None:
        super().__init__(hidden, intermediate)
        self.act = _ACT[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


class Rotary2D(nn.Module):
    """Axial RoPE: half of each head's frequency pairs rotate with the patch row, half with the column.

    The inverse frequencies of a 1D rotary of ``head_dim`` are dealt alternately to the row and the
    column axis, so both axes span the full frequency range.
    """

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device="cpu") / head_dim)
        self.inv_rows, self.inv_cols = inv[0::2], inv[1::2]  # not buffers: never in checkpoints

    def forward(self, rows: int, cols: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [rows * cols, head_dim] for a row-major patch grid."""
        r = torch.arange(rows, dtype=torch.float32, device=device)
        c = torch.arange(cols, dtype=torch.float32, device=device)
        fr = (r[:, None] * self.inv_rows.to(device)[None, :])[:, None, :].expand(rows, cols, -1)
        fc = (c[:, None] * self.inv_cols.to(device)[None, :])[None, :, :].expand(rows, cols, -1)
        freqs = torch.cat([fr, fc], dim=-1).reshape(rows * cols, -1)
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos(), emb.sin()


class VisionAttention(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.heads, self.head_dim = config.num_attention_heads, config.head_dim
        inner = self.heads * self.head_dim
        self.q_proj = nn.Linear(config.hidden_size, inner, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, inner, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, inner, bias=False)
        self.o_proj = nn.Linear(inner, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [B, P, D] -> [B, P, D]; every patch sees every patch of its own image."""
        bsz, n, _ = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(bsz, n, self.heads, self.head_dim).transpose(1, 2)

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        out = F.scaled_dot_product_attention(q, k, v)
        return self.o_proj(out.transpose(1, 2).reshape(bsz, n, -1))


class VisionBlock(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attention = VisionAttention(config)
        self.ffn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.feed_forward = GatedMLP(config.hidden_size, config.intermediate_size, config.hidden_act)


class VisionTransformer(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(VisionBlock(config) for _ in range(config.num_hidden_layers))


class VisionEncoder(nn.Module):
    """Images of one size [B, C, H, W] (H, W multiples of the patch) -> patch features [B, rows*cols, D]."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.config = config
        p = config.patch_size
        self.patch_conv = nn.Conv2d(config.num_channels, config.hidden_size, kernel_size=p, stride=p, bias=False)
        self.ln_pre = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.transformer = VisionTransformer(config)
        self.rotary = Rotary2D(config.head_dim, config.rope_theta)

    def forward(self, pixels: torch.Tensor, num_layers: int | None = None) -> torch.Tensor:
        """``num_layers`` blocks are run (all by default): the projector may read an earlier layer."""
        p = self.config.patch_size
        if pixels.shape[-2] % p or pixels.shape[-1] % p:
            raise ValueError(f"image sides {tuple(pixels.shape[-2:])} must be multiples of the patch size {p}")
        patches = self.patch_conv(pixels.to(self.patch_conv.weight.dtype))  # [B, D, rows, cols]
        rows, cols = patches.shape[-2:]
        x = self.ln_pre(patches.flatten(2).transpose(1, 2))
        cos, sin = self.rotary(rows, cols, x.device)
        for block in self.transformer.layers[:num_layers]:
            x = x + block.attention(block.attention_norm(x), cos, sin)
            x = x + block.feed_forward(block.ffn_norm(x))
        return x
