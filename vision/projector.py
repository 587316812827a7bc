"""The Mistral3-style projector: RMSNorm, 2x2 (``spatial_merge_size``) patch merge, linear-GELU-linear.

Merging concatenates the features of each ``m x m`` window of the patch grid (channel-major, then
row and column inside the window, as an unfold would) and maps them back to the encoder width, so
an image of ``rows x cols`` patches yields ``rows/m * cols/m`` embeddings in the text width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.layers import RMSNorm

_ACT = {"gelu": F.gelu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"), "silu": F.silu}


class PatchMerger(nn.Module):
    def __init__(self, hidden: int, merge: int) -> None:
        super().__init__()
        self.merge = merge
        self.merging_layer = nn.Linear(hidden * merge * merge, hidden, bias=False)

    def forward(self, x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
        """x [B, rows*cols, D] (row-major grid) -> [B, rows/m * cols/m, D]."""
        m, (bsz, _, d) = self.merge, x.shape
        if rows % m or cols % m:
            raise ValueError(f"patch grid {rows}x{cols} is not a multiple of the merge size {m}")
        grid = x.view(bsz, rows // m, m, cols // m, m, d).permute(0, 1, 3, 5, 2, 4)
        return self.merging_layer(grid.reshape(bsz, (rows // m) * (cols // m), d * m * m))


class Projector(nn.Module):
    """Vision features -> text embeddings. Names as in the checkpoints (``multi_modal_projector.*``)."""

    def __init__(self, vision_hidden: int, text_hidden: int, *, merge: int, act: str, bias: bool, eps: float) -> None:
        super().__init__()
        if act not in _ACT:
            raise ValueError(f"unsupported projector_hidden_act {act!r}; expected one of {', '.join(_ACT)}")
        self.norm = RMSNorm(vision_hidden, eps)
        self.patch_merger = PatchMerger(vision_hidden, merge)
        self.linear_1 = nn.Linear(vision_hidden, text_hidden, bias=bias)
        self.act = _ACT[act]
        self.linear_2 = nn.Linear(text_hidden, text_hidden, bias=bias)

    def forward(self, features: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
        x = self.patch_merger(self.norm(features), rows, cols)
        return self.linear_2(self.act(self.linear_1(x)))
