"""Token choice: greedy, temperature sampling, Gumbel-max, and speculative acceptance.

Every random draw goes through the request's own ``torch.Generator`` so that a seeded request
gives the same tokens alone or inside any batch.
"""

from __future__ import annotations

import torch


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
    probs = probabilities(logits, temperature)
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, 1, generator=generator).view(probs.shape[:-1])


def gumbel_pick(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
    """Gumbel-max in float64 as the diffusion reference samples: argmax(logits - T * log(-log u))."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    u = torch.rand(logits.shape, dtype=torch.float64, generator=generator)
    return (logits.double() - temperature * torch.log(-torch.log(u))).argmax(dim=-1)


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
    tokens follow the AR distribution exactly.
    """
    if temperature <= 0:
        ar = target_logits.argmax(dim=-1).tolist()
        accepted = 0
        while accepted < len(draft) and draft[accepted] == ar[accepted]:
            accepted += 1
        return accepted, ar[accepted]
    p = probabilities(target_logits, temperature).cpu()
    q = draft_probs.cpu() if draft else None
    for i, token in enumerate(draft):
        ratio = p[i, token] / q[i, token] if q[i, token] > 0 else torch.tensor(1.0, dtype=torch.float64)
        if torch.rand((), dtype=torch.float64, generator=generator) < ratio:
            continue
        residual = (p[i] - q[i]).clamp(min=0)
        total = residual.sum()
        dist = residual / total if total > 0 else p[i]
        return i, int(torch.multinomial(dist, 1, generator=generator))
    return len(draft), int(torch.multinomial(p[len(draft)], 1, generator=generator))
