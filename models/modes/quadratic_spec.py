"""Quadratic self-speculation: verification and the next draft in one forward per cycle.

The cycle's input is ``[d_0, M x L, d_1, M x L, ..., d_k, M x L]`` (ARCHITECTURE.md §2): the d_j are
causal among themselves and verify the current draft; the L mask slots after d_j see d_0..d_j and
each other, drafting the continuation that holds if d_0..d_j are accepted. After accepting a
drafts plus a bonus token, the draft for the next cycle is already there: sub-block a's slots
2..L (slot 1 sits where the bonus token goes). Only those L-1 rows of the (k+1)(L+1) get logits:
the verify rows first, then, once the acceptance is known, sub-block a's. Only the accepted d_j
keep their keys/values. The first cycle after the prefill has no draft to verify (k = 0).
NFE = prefill + cycles.
"""

from __future__ import annotations

import torch

from models.modes.base import DecodeState, Draft, Plan, Verify
from models.segments import quadratic_segment


class QuadraticSpecState(DecodeState):
    mode = "quadratic_spec"
    prefill_counts_as_forward = True

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.verify: list[int] = []  # d_0 (emitted, not yet cached) followed by the current draft
        self.draft_probs: torch.Tensor | None = None

    def after_prefill(self, token: int) -> list[int]:
        self.verify = [token]
        return self.emit(self.verify)

    def plan_decode(self) -> Plan:
        segment = quadratic_segment(self.verify, self.cached_len, self.block_length, self.mask_id)
        return Plan([segment], Draft(self.block_length - 1, verify=Verify(self.verify[1:], self.draft_probs)))

    def advance_decode(self, plan: Plan, result: list[int]) -> list[int]:
        self.nfe += 1
        accepted, bonus, *next_draft = result
        draft = self.verify[1:]
        emitted = self.emit([*draft[:accepted], bonus])
        if draft:
            self.accepted_lengths.append(accepted + 1)
        self.cached_len += accepted + 1
        self.verify = [bonus, *next_draft]
        self.draft_probs = plan.work.q_out
        return emitted
