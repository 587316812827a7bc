"""Linear self-speculation: a bidirectional draft of the block, then a causal verify of it.

Per cycle: draft ``[next, M x (L-1)]`` (adapter on, cache read-only), verify ``[next, d_1..d_w]``
(adapter off, keys/values written), accept the longest prefix the AR pass agrees with, emit it plus
one bonus token, and roll the cache back to what was accepted. The verify window ``w`` is the whole
draft until the request has finished ``WINDOW_CYCLES`` cycles, then follows what its cycles accept
(``DecodeState.verify_window``; the draft's head reads only those rows): on a CPU a verify's cost grows with its
rows (bundled model, bf16: 32 rows cost 2.2 AR steps, 16 rows 1.3), and where 4-5 of a draft's 31
tokens are accepted (the bundled model on held-out code) most of a whole-draft verify's rows are never
used. Checking fewer of the draft's tokens changes no emitted token: greedy acceptance stops at the first
disagreement, and sampled acceptance tests each position on its own, so a shorter window only ends
a cycle earlier (its bonus token is AR's next token either way). Lossless at temperature 0; above
it, rejection sampling keeps the AR distribution. NFE = prefill + drafts + verifies. In a crowded
batch, or while its own cycles do not pay (``speculate`` False), a new cycle is not started: the
request takes AR steps instead.
"""

from __future__ import annotations

import torch

from models.modes.base import DecodeState, Draft, Plan, Score, Verify, ar_step, draft_segment
from models.segments import causal_segment


class LinearSpecState(DecodeState):
    mode = "linear_spec"
    prefill_counts_as_forward = True
    speculative = True

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.next_token = -1
        self.draft: list[int] | None = None  # None: the next pass is a draft
        self.draft_probs: torch.Tensor | None = None

    def after_prefill(self, token: int, scores: list[Score] | None) -> list[int]:
        self.next_token = token
        return self.emit([token], scores)

    def plan_decode(self) -> Plan:
        length = self.block_length
        if self.draft is None and not self.speculate:
            return ar_step(self.next_token, self.cached_len, demoted=True)
        if self.draft is None:  # the whole block drafts; the head reads only the rows the verify will check
            window = self.verify_window()
            segment = draft_segment(self.next_token, self.cached_len, length, self.mask_id,
                                    logit_rows=list(range(1, window + 1)))  # fmt: skip
            return Plan([segment], Draft(window))
        segment = causal_segment([self.next_token, *self.draft], self.cached_len, write=True)
        return Plan([segment], Verify(self.draft, self.draft_probs))

    def advance_decode(self, plan: Plan, result: list[int]) -> list[int]:
        self.nfe += 1
        if isinstance(plan.work, Draft):
            self.draft, self.draft_probs = result, plan.work.q_out
            return []
        accepted, bonus = result
        emitted = self.accept(plan.work.draft, accepted, bonus, plan.work.scores)
        self.next_token = bonus
        self.draft = self.draft_probs = None
        return emitted
