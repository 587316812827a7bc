"""Quadratic self-speculation, sparse: verification and the next draft in one forward per cycle.

A cycle verifies the current draft ``d_1..d_n`` behind ``d_0`` (the last emitted token) and, in the
same forward, drafts the block that follows for some of the possible outcomes of the verification,
so the next cycle's draft is ready if one of those happens. Its segments:

- a causal verify block ``[d_0, .., d_n]`` that writes its keys/values (the d_j see exactly what
  the AR steps that would produce them see: lossless);
- per drafted outcome (a *branch*: an acceptance length ``a`` and a guessed bonus token ``g``), the
  block ``[g, M x (L-1)]`` at the positions after ``d_a``: it sees the cached prefix and ``d_0..d_a``
  (read from the cache slots the verify block writes earlier in the same layer) and itself, which is
  what a linear-speculation draft behind ``g`` would see. Slots 2..L become the next draft if the
  verification accepts ``a`` tokens and its bonus token is ``g`` (their logits are deferred: only the
  selected branch's rows go through the output head).

The guess ``g`` for a rejected ``d_{a+1}`` is the draft's most likely other token at that slot (on
held-out code it was the verifier's token in about half of the rejections); after a whole accepted
draft nothing is guessed and slot 1 is a mask. A branch behind a mask drafts without the token it
follows, and its drafts were accepted far less (bench/RESULTS.md). By default a cycle drafts the
``DEFAULT_BRANCHES`` outcomes most likely under the draft's own probabilities (acceptance length a
with its guess: ``c_1 * .. * c_a * g_{a+1}``, c a draft token's probability, g its guess's), L *
(branches + 1) rows with a whole draft to verify; ``branches`` >= L drafts every acceptance length
(the dense scheme of the family's paper, L(L+1) rows, here with guessed seeds). When the
verification's outcome was not drafted, the next forward drafts alone behind the bonus token, as
linear speculation does (as after the prefill).

As in linear speculation, a draft keeps only the tokens of its verify window
(``DecodeState.verify_window``: the whole block for the first cycles, then about twice what cycles
emit), so a cycle's verify block has ``w + 1`` rows rather than L; a branch drafts for the window
known when its cycle is planned. The emitted tokens are the AR tokens either way (temperature 0) or
follow the AR distribution (temperature > 0): the branch choice and the window only decide whether
and how far the next cycle has a draft to verify. NFE = prefill + cycles + drafts alone. In a
crowded batch, or while its own cycles do not pay (``speculate`` False), a cycle drafts nothing
ahead: a held draft is verified alone, and then the request takes AR steps (verifies of an empty
draft) until it may speculate again.
"""

from __future__ import annotations

import torch

from models.modes.base import DecodeState, Draft, Plan, Score, Verify, draft_segment
from models.segments import Segment, causal_segment

DEFAULT_BRANCHES = 1  # on a CPU a second branch costs more than the cycles it saves (bench/RESULTS.md)


def cycle_segments(
    verify: list[int], start: int, length: int, branches: list[int], seeds: list[int], mask_id: int, window: int
) -> list[Segment]:
    """A cycle's segments: the verify block ``verify`` at ``start`` (the cache length), then for each
    acceptance length ``a`` in ``branches`` a branch behind ``verify[a]``: its seed (the bonus token
    guessed for ``a``; -1: a mask) and ``length - 1`` mask slots, of which the first ``window`` are
    deferred rows (the next cycle's draft, if the branch is taken)."""
    segments = [causal_segment(verify, start, write=True)]
    for a, seed in zip(branches, seeds):
        first = mask_id if seed < 0 else seed
        deferred = list(range(1, window + 1))
        segments.append(draft_segment(first, start + a + 1, length, mask_id, logit_rows=[], deferred_rows=deferred))
    return segments


class QuadraticSpecState(DecodeState):
    mode = "quadratic_spec"
    prefill_counts_as_forward = True
    speculative = True

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.max_branches = min(self.params.branches or DEFAULT_BRANCHES, self.block_length)
        self.verify: list[int] = []  # d_0 (emitted, not yet cached) followed by the current draft
        self.branches: list[int] = []  # acceptance lengths to draft ahead for ...
        self.seeds: list[int] = []  # ... behind these guessed bonus tokens (-1: a mask)
        self.draft_probs: torch.Tensor | None = None

    def after_prefill(self, token: int, scores: list[Score] | None) -> list[int]:
        self.verify = [token]
        return self.emit(self.verify, scores)

    def plan_decode(self) -> Plan:
        length, window = self.block_length, self.verify_window()
        choose = min(self.max_branches, window + 1)  # a window of w tokens has w + 1 acceptance lengths
        if not self.speculate:  # the verify block alone: with no draft to verify, an AR step
            segments = cycle_segments(self.verify, self.cached_len, length, [], [], self.mask_id, window)
            return Plan(segments, Verify(self.verify[1:], self.draft_probs), demoted=len(self.verify) == 1)
        if len(self.verify) == 1:  # nothing to verify: a draft behind d_0, as linear speculation drafts
            read = list(range(1, window + 1))
            segment = draft_segment(self.verify[0], self.cached_len, length, self.mask_id, logit_rows=read)
            return Plan([segment], Draft(window, choose=choose))
        segments = cycle_segments(self.verify, self.cached_len, length, self.branches, self.seeds, self.mask_id, window)
        work = Draft(
            window,
            verify=Verify(self.verify[1:], self.draft_probs),
            branches=list(self.branches),
            seeds=list(self.seeds),
            choose=choose,
        )
        return Plan(segments, work)

    def advance_decode(self, plan: Plan, result: list[int]) -> list[int]:
        self.nfe += 1
        work = plan.work
        if isinstance(work, Draft) and work.verify is None:
            self._drafted(self.verify[0], result, work)
            return []
        accepted, bonus, *rest = result
        verify = work if isinstance(work, Verify) else work.verify
        emitted = self.accept(verify.draft, accepted, bonus, verify.scores)
        if isinstance(work, Draft) and rest[0] >= 0:
            self._drafted(bonus, rest, work)
        else:  # no branch was drafted for this acceptance and bonus: the next forward drafts behind the bonus
            self.verify, self.branches, self.seeds, self.draft_probs = [bonus], [], [], None
        return emitted

    def _drafted(self, first: int, result: list[int], work: Draft) -> None:
        """The new draft behind ``first`` and where the next cycle drafts ahead, from a draft's result."""
        count, choose = work.count, work.choose
        lengths, seeds = result[count : count + choose], result[count + choose : count + 2 * choose]
        kept = [(a, seed) for a, seed in zip(lengths, seeds) if a >= 0]
        self.verify = [first, *result[:count]]
        self.branches, self.seeds = [a for a, _ in kept], [seed for _, seed in kept]
        self.draft_probs = work.q_out
