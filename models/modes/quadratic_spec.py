"""Quadratic self-speculation: verification and the next draft in one forward per cycle.

The cycle's input is ``[d_0, M x L, d_1, M x L, ..., d_k, M x L]`` (ARCHITECTURE.md §2): the d_j are
causal among themselves and verify the current draft; the L mask slots after d_j see d_0..d_j and
each other, drafting the continuation that holds if d_0..d_j are accepted. After accepting a
drafts plus a bonus token, the draft for the next cycle is already there: sub-block a's slots
2..L (slot 1 sits where the bonus token goes). Only the accepted d_j keep their keys/values.
The first cycle after the prefill has no draft to verify (k = 0). NFE = prefill + cycles.
"""

from __future__ import annotations

import torch

from models.modes.base import DecodeState
from models.modes.linear_spec import draft_tokens
from models.sampling import speculative_accept
from models.segments import Segment, quadratic_segment


class QuadraticSpecState(DecodeState):
    mode = "quadratic_spec"
    prefill_counts_as_forward = True

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.verify: list[int] = []  # d_0 (emitted, not yet cached) followed by the current draft
        self.draft_probs: torch.Tensor | None = None

    def after_prefill(self, last_logits: torch.Tensor) -> list[int]:
        self.verify = [self.choose(last_logits)]
        return self.emit(self.verify)

    def plan_decode(self) -> list[Segment]:
        return [quadratic_segment(self.verify, self.cached_len, self.block_length, self.mask_id)]

    def advance_decode(self, logits: list[torch.Tensor]) -> list[int]:
        self.nfe += 1
        group = self.block_length + 1
        rows = logits[0].view(len(self.verify), group, -1)
        draft = self.verify[1:]
        accepted, bonus = speculative_accept(draft, rows[:, 0], self.draft_probs, self.temperature, self.generator)
        emitted = self.emit([*draft[:accepted], bonus])
        if draft:
            self.accepted_lengths.append(accepted + 1)
        self.cached_len += accepted + 1
        next_draft, self.draft_probs = draft_tokens(rows[accepted, 2:], self.mask_id, self.temperature, self.generator)
        self.verify = [bonus, *next_draft]
        return emitted
