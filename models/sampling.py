"""Token choice: greedy, temperature sampling, Gumbel-max, and speculative acceptance.

Every random draw goes through the request's own ``torch.Generator`` so that a seeded request
gives the same tokens alone or inside any batch. That generator lives on the CPU: logits may sit
on the model's device, and a draw moves only what it needs to the host.
"""

from __future__ import annotations

import torch

import kernels


def without_token(logits: torch.Tensor, token_id: int) -> torch.Tensor:
    """Logits with one token made impossible (the mask token is never a draft or unmask choice)."""
    out = logits.clone()
    out[..., token_id] = float("-inf")
    return out


def probabilities(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return torch.softmax(logits.double() / temperature, dim=-1)


def pick(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
    """Rows of logits [..., V] -> token ids [...]: argmax at temperature 0, else a sample."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = probabilities(logits, temperature).cpu()
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, 1, generator=generator).view(probs.shape[:-1])


def gumbel_pick(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
    """Gumbel-max in float64 as the diffusion reference samples: argmax(logits - T * log(-log u))."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    u = torch.rand(logits.shape, dtype=torch.float64, generator=generator)
    return (logits.double().cpu() - temperature * torch.log(-torch.log(u))).argmax(dim=-1)


def speculative_accept(
    draft: list[int],
    target_logits: torch.Tensor,
    draft_probs: torch.Tensor | None,
    temperature: float,
    generator: torch.Generator | None,
) -> tuple[int, int]:
    """Verify drafted tokens against the target (AR) distribution.

    ``target_logits[i]`` is the AR prediction for the position of ``draft[i]``; it has one more row
    than ``draft`` (the bonus position). Returns ``(accepted, next_token)``: the length of the
    accepted draft prefix and the token that follows it. At temperature 0 a draft token is accepted
    iff it equals the AR argmax (lossless greedy). Above it, standard speculative rejection
    sampling: accept with probability min(1, p/q), otherwise sample from (p - q)+, so the emitted
    tokens follow the AR distribution exactly. Both run through ``kernels.verify_accept*`` (Triton
    on CUDA); the uniforms come from the request's generator, one per draft token and one draw.
    """
    device = target_logits.device
    draft_ids = torch.tensor([draft], dtype=torch.long, device=device)  # [1, n], n may be 0
    if temperature <= 0:
        accepted, tokens, _ = kernels.verify_accept(draft_ids, target_logits.argmax(dim=-1)[None], None)
    else:
        p = probabilities(target_logits, temperature)
        q = draft_probs if draft else p.new_zeros((0, p.shape[-1]))
        accept_u = torch.rand((1, len(draft)), dtype=torch.float64, generator=generator).to(device)
        sample_u = torch.rand(1, dtype=torch.float64, generator=generator).to(device)
        accepted, tokens, _ = kernels.verify_accept_sampled(draft_ids, p[None], q[None], accept_u, sample_u, None)
    a = int(accepted[0])
    return a, int(tokens[0, a])
