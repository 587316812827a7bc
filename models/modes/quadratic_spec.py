"""Quadratic self-speculation, sparse: verification and the next draft in one forward per cycle.

A cycle verifies the current draft ``d_1..d_n`` behind ``d_0`` (the last emitted token) and, in the
same forward, drafts the block that follows for some of the possible acceptance lengths, so the
next cycle's draft is ready whichever of those the verification picks. Its segments:

- a causal verify block ``[d_0, .., d_n]`` that writes its keys/values (the d_j see exactly what
  the AR steps that would produce them see: lossless);
- per drafted acceptance length ``a`` (a *branch*), L mask slots at positions after ``d_a`` that see
  the cached prefix and ``d_0..d_a`` — read from the cache slots the verify block writes earlier in
  the same layer — and each other. Slot 1 sits where the bonus token goes and is never read; slots
  2..L become the next draft if ``a`` is accepted (their logits are deferred: only the selected
  branch's rows go through the output head).

Drafting every acceptance length (``branches`` >= L) is the dense scheme of the family's paper:
L verify rows plus L*L mask slots, 1056 query rows per forward at block 32. By default a cycle drafts only the
``DEFAULT_BRANCHES`` acceptance lengths most likely under the draft's own confidences (acceptance
length a: ``c_1 * .. * c_a * (1 - c_{a+1})``), L * (branches + 1) rows; when the verification
accepts a length that was not drafted, the next cycle has no draft and is a plain draft cycle
(one token, like the first cycle after the prefill). The emitted tokens are the AR tokens either
way (temperature 0) or follow the AR distribution (temperature > 0): the branch choice only
decides whether the next cycle has a draft to verify. NFE = prefill + cycles. In a crowded batch,
or while its own cycles do not pay (``speculate`` False), a cycle drafts nothing ahead: the current
draft is verified alone, and then the request takes AR steps (verifies of an empty draft) until it
may speculate again.
"""

from __future__ import annotations

import torch

from models.modes.base import DecodeState, Draft, Plan, Score, Verify
from models.segments import Segment, bidirectional_segment, causal_segment

DEFAULT_BRANCHES = 1  # on a CPU a second branch costs more than the cycles it saves (bench/RESULTS.md)


def cycle_segments(verify: list[int], start: int, length: int, branches: list[int], mask_id: int) -> list[Segment]:
    """A cycle's segments: the verify block ``verify`` at ``start`` (the cache length), then a branch of
    ``length`` mask slots behind ``verify[a]`` for each acceptance length ``a`` in ``branches``."""
    segments = [causal_segment(verify, start, write=True)]
    for a in branches:
        segments.append(
            bidirectional_segment(
                [mask_id] * length, start + a + 1, adapter=True, logit_rows=[], deferred_rows=list(range(1, length))
            )
        )
    return segments


class QuadraticSpecState(DecodeState):
    mode = "quadratic_spec"
    prefill_counts_as_forward = True
    speculative = True

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.max_branches = min(self.params.branches or DEFAULT_BRANCHES, self.block_length)
        self.verify: list[int] = []  # d_0 (emitted, not yet cached) followed by the current draft
        self.branches = [0]  # acceptance lengths to draft ahead for
        self.draft_probs: torch.Tensor | None = None

    def after_prefill(self, token: int, scores: list[Score] | None) -> list[int]:
        self.verify = [token]
        return self.emit(self.verify, scores)

    def plan_decode(self) -> Plan:
        if not self.speculate:  # the verify block alone: with no draft to verify, an AR step
            segments = cycle_segments(self.verify, self.cached_len, self.block_length, [], self.mask_id)
            return Plan(segments, Verify(self.verify[1:], self.draft_probs), demoted=len(self.verify) == 1)
        segments = cycle_segments(self.verify, self.cached_len, self.block_length, self.branches, self.mask_id)
        work = Draft(
            self.block_length - 1,
            verify=Verify(self.verify[1:], self.draft_probs),
            branches=list(self.branches),
            choose=self.max_branches,
        )
        return Plan(segments, work)

    def advance_decode(self, plan: Plan, result: list[int]) -> list[int]:
        self.nfe += 1
        accepted, bonus, *rest = result
        verify = plan.work if isinstance(plan.work, Verify) else plan.work.verify
        emitted = self.accept(verify.draft, accepted, bonus, verify.scores)
        count = plan.work.count if isinstance(plan.work, Draft) else 0
        next_draft, lengths = rest[:count], rest[count:]
        if next_draft and next_draft[0] >= 0:
            self.verify, self.branches, self.draft_probs = [bonus, *next_draft], lengths, plan.work.q_out
        else:  # the accepted length had no branch drafted: draft from scratch behind the bonus token
            self.verify, self.branches, self.draft_probs = [bonus], [0], None
        return emitted
