"""Training the linear-spec drafter: a LoRA adapter on o_proj, on for draft rows only.

The drafter is trained by self-distillation. Its targets are the base model's own greedy AR
continuations, so it learns to predict what the verifier will accept; the base weights stay frozen
and AR rows never see the adapter, so AR logits (and with them every lossless guarantee) are
unchanged. An example is a sequence whose tokens after ``cut`` are the base model's greedy
continuation: the model sees ``seq[:cut + 1]`` as a causal prefix (no adapter), then the draft
block exactly as linear_spec builds it, ``[seq[cut], mask x (L - 1)]`` at positions
``cut..cut+L-1``, bidirectional and with the adapter on; the loss is the cross-entropy of the
block's mask rows against the continuation, weighted ``decay ** i`` for the i-th draft token
(a token only counts when every one before it is accepted).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from models.model import LoraWeights, TriModeModel


class DraftAdapter(nn.Module):
    """Trainable LoRA factors for every layer's o_proj: ``o += (alpha / r) * B(A(x))`` on draft rows.

    A starts random and B at zero (PEFT's initialisation), so training starts from the base drafter."""

    def __init__(self, model: TriModeModel, rank: int, alpha: float, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.rank, self.alpha = rank, alpha
        self.a = nn.ParameterList()
        self.b = nn.ParameterList()
        for layer in model.encoder.layers:
            out_features, in_features = layer.self_attn.o_proj.weight.shape
            self.a.append(nn.Parameter(torch.randn(rank, in_features, generator=gen) / math.sqrt(in_features)))
            self.b.append(nn.Parameter(torch.zeros(out_features, rank)))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def attach(self, model: TriModeModel) -> None:
        """Make the model's draft rows use these factors (and the base weights frozen)."""
        for param in model.parameters():
            param.requires_grad_(False)
        for layer, a, b in zip(model.encoder.layers, self.a, self.b):
            layer.self_attn.lora = LoraWeights(a=a, b=b, scale=self.scale)

    def save(self, folder: Path, base_model: str) -> None:
        """The official layout: PEFT's ``adapter_config.json`` and ``adapter_model.safetensors``."""
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for index, (a, b) in enumerate(zip(self.a, self.b)):
            prefix = f"base_model.model.encoder.layers.{index}.self_attn.o_proj"
            tensors[f"{prefix}.lora_A.weight"] = a.detach().float().contiguous()
            tensors[f"{prefix}.lora_B.weight"] = b.detach().float().contiguous()
        save_file(tensors, folder / "adapter_model.safetensors")
        config = {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model,
            "r": self.rank,
            "lora_alpha": self.alpha,
            "lora_dropout": 0.0,
            "target_modules": ["o_proj"],
            "bias": "none",
            "use_rslora": False,
            "fan_in_fan_out": False,
            "inference_mode": True,
        }
        (folder / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")


def draft_mask(cut: int, block: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Boolean [cut + block, cut + block] visibility: a causal prefix of ``cut`` tokens, then a block
    that sees the prefix and itself (the prefix never sees the block)."""
    n = cut + block
    idx = torch.arange(n, device=device)
    causal = idx[None, :] <= idx[:, None]
    in_block = idx >= cut
    return causal | (in_block[:, None] & in_block[None, :])


def draft_logits(model: TriModeModel, sequences: torch.Tensor, cut: int, block: int) -> torch.Tensor:
    """Diffusion logits [B, block - 1, V] of the mask rows of a draft block at ``cut`` (see module doc)."""
    inputs = sequences[:, : cut + block].clone()
    inputs[:, cut + 1 :] = model.config.mask_token_id
    positions = torch.arange(cut + block, device=sequences.device)
    adapter = positions >= cut
    logits = model.forward_dense(inputs, positions, draft_mask(cut, block, sequences.device), adapter=adapter)
    return logits[:, cut + 1 :]


def draft_loss(
    model: TriModeModel, sequences: torch.Tensor, cut: int, block: int, decay: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weighted cross-entropy, per-example greedy accepted length) of drafting at ``cut``."""
    logits = draft_logits(model, sequences, cut, block)
    targets = sequences[:, cut + 1 : cut + block].long()
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    weights = decay ** torch.arange(block - 1, dtype=ce.dtype, device=ce.device)
    loss = (ce.view(targets.shape) * weights).sum(dim=1).mean() / weights.sum()
    return loss, accepted_length(logits.detach(), targets, model.config.mask_token_id)


def accepted_length(logits: torch.Tensor, targets: torch.Tensor, mask_id: int) -> torch.Tensor:
    """Draft tokens a greedy verifier accepts: the leading run where the draft (argmax, never the
    mask token, as linear_spec drafts) equals the target. [B]."""
    allowed = logits.clone()
    allowed[..., mask_id] = float("-inf")
    agree = (allowed.argmax(dim=-1) == targets).long()
    return agree.cumprod(dim=1).sum(dim=1)
