"""Linear self-speculation: a bidirectional draft of the block, then a causal verify of it.

Per cycle: draft ``[next, M x (L-1)]`` (adapter on, cache read-only), verify ``[next, d_1..d_{L-1}]``
(adapter off, keys/values written), accept the longest prefix the AR pass agrees with, emit it plus
one bonus token, and roll the cache back to what was accepted. Lossless at temperature 0; above
it, rejection sampling keeps the AR distribution. NFE = prefill + drafts + verifies.
"""

from __future__ import annotations

import torch

from models.modes.base import DecodeState
from models.sampling import pick, probabilities, speculative_accept, without_token
from models.segments import Segment, bidirectional_segment, causal_segment


class LinearSpecState(DecodeState):
    mode = "linear_spec"
    prefill_counts_as_forward = True

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.next_token = -1
        self.draft: list[int] | None = None  # None: the next pass is a draft
        self.draft_probs: torch.Tensor | None = None

    def after_prefill(self, last_logits: torch.Tensor) -> list[int]:
        self.next_token = self.choose(last_logits)
        return self.emit([self.next_token])

    def plan_decode(self) -> list[Segment]:
        length = self.block_length
        if self.draft is None:
            block = [self.next_token] + [self.mask_id] * (length - 1)
            return [bidirectional_segment(block, self.cached_len, adapter=True, logit_rows=list(range(1, length)))]
        return [causal_segment([self.next_token, *self.draft], self.cached_len, write=True)]

    def advance_decode(self, logits: list[torch.Tensor]) -> list[int]:
        self.nfe += 1
        if self.draft is None:
            self.draft, self.draft_probs = draft_tokens(logits[0], self.mask_id, self.temperature, self.generator)
            return []
        accepted, bonus = speculative_accept(self.draft, logits[0], self.draft_probs, self.temperature, self.generator)
        emitted = self.emit([*self.draft[:accepted], bonus])
        self.accepted_lengths.append(accepted + 1)
        self.cached_len += accepted + 1  # next_token and the accepted drafts are now committed
        self.next_token = bonus
        self.draft = None
        return emitted


def draft_tokens(
    logits: torch.Tensor, mask_id: int, temperature: float, generator: torch.Generator | None
) -> tuple[list[int], torch.Tensor | None]:
    """Draft tokens from diffusion logits (never the mask token) and, when sampling, their q."""
    allowed = without_token(logits, mask_id)
    tokens = pick(allowed, temperature, generator)
    probs = probabilities(allowed, temperature) if temperature > 0 else None
    return tokens.tolist(), probs
