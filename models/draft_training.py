"""Training the linear-spec drafter: a LoRA adapter on o_proj (and optionally the MLP), on for draft rows only.

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

from models.model import ADAPTER_MODULES, LoraWeights, TriModeModel

MLP_MODULES = tuple(name for name, path in ADAPTER_MODULES.items() if path.startswith("mlp."))


class DraftAdapter(nn.Module):
    """Trainable LoRA factors on every layer's o_proj and, with ``mlp_rank``, on its MLP's gate, up and down
    projections: ``out += (alpha / r) * B(A(x))`` on draft rows (one scale for every projection).

    A starts random and B at zero (PEFT's initialisation), so training starts from the base drafter."""

    def __init__(self, model: TriModeModel, rank: int, alpha: float, seed: int = 0, mlp_rank: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.ranks = {"o_proj": rank} | {name: mlp_rank for name in MLP_MODULES if mlp_rank}
        self.alpha = alpha
        self.factors = nn.ModuleList()
        for layer in model.encoder.layers:
            factors = nn.ParameterDict()
            for module, r in self.ranks.items():
                out_features, in_features = layer.get_submodule(ADAPTER_MODULES[module]).weight.shape
                a = torch.randn(r, in_features, generator=gen) / math.sqrt(in_features)
                factors[f"{module}_A"] = nn.Parameter(a)
                factors[f"{module}_B"] = nn.Parameter(torch.zeros(out_features, r))
            self.factors.append(factors)

    def start_from(self, model: TriModeModel) -> None:
        """Copy the factors of the adapter ``model`` carries (``models.loading.load_adapter``) into these,
        to continue training a saved drafter; its ranks and scale must be this adapter's."""
        for index, (layer, factors) in enumerate(zip(model.encoder.layers, self.factors)):
            for module in self.ranks:
                lora = layer.self_attn.lora if module == "o_proj" else layer.mlp.lora.get(module)
                a, b = factors[f"{module}_A"], factors[f"{module}_B"]
                if lora is None or lora.a.shape != a.shape or lora.b.shape != b.shape or lora.scale != self.scale:
                    raise ValueError(f"the adapter to start from does not match {module} of layer {index} "
                                     f"(rank {self.ranks[module]}, scale {self.scale})")  # fmt: skip
                with torch.no_grad():
                    a.copy_(lora.a)
                    b.copy_(lora.b)

    @property
    def scale(self) -> float:
        return self.alpha / self.ranks["o_proj"]

    def attach(self, model: TriModeModel) -> None:
        """Make the model's draft rows use these factors (and the base weights frozen)."""
        for param in model.parameters():
            param.requires_grad_(False)
        for layer, factors in zip(model.encoder.layers, self.factors):
            for module in self.ranks:
                a, b = factors[f"{module}_A"], factors[f"{module}_B"]
                layer.set_lora(module, LoraWeights(a=a, b=b, scale=self.scale))

    def save(self, folder: Path, base_model: str, dtype: torch.dtype = torch.float32) -> None:
        """The official layout: PEFT's ``adapter_config.json`` and ``adapter_model.safetensors`` (the MLP's
        ranks and alphas in ``rank_pattern``/``alpha_pattern``), factors stored in ``dtype``."""
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for index, factors in enumerate(self.factors):
            for module in self.ranks:
                prefix = f"base_model.model.encoder.layers.{index}.{ADAPTER_MODULES[module]}"
                tensors[f"{prefix}.lora_A.weight"] = factors[f"{module}_A"].detach().to(dtype).contiguous()
                tensors[f"{prefix}.lora_B.weight"] = factors[f"{module}_B"].detach().to(dtype).contiguous()
        save_file(tensors, folder / "adapter_model.safetensors")
        others = {module: r for module, r in self.ranks.items() if module != "o_proj"}
        config = {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model,
            "r": self.ranks["o_proj"],
            "lora_alpha": self.alpha,
            "target_modules": list(self.ranks),
            "lora_dropout": 0.0,
            "bias": "none",
            "use_rslora": False,
            "fan_in_fan_out": False,
            "inference_mode": True,
        }
        if others:
            config["rank_pattern"] = others
            config["alpha_pattern"] = {module: self.scale * r for module, r in others.items()}
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
