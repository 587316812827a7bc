"""Block diffusion: parallel unmasking of a block by confidence, then one causal commit pass.

A block starts as ``[seed, M x (L-1)]`` where the seed is the AR prediction after the prefix.
Each denoise pass (bidirectional, cache read-only) commits the most confident masked slot plus
every masked slot whose confidence reaches the threshold; the block ends when no mask is left
(among the slots still needed) or when an EOS is committed with no mask before it. A causal pass
over the finished block then writes its keys/values and yields the next seed.
NFE = denoise passes + one commit pass per block (the prompt prefill is not counted).

Revision (``revise``): the model's output at a slot it can see is untrained (the objective scores
masked slots only), so a decided token's confidence is read where it is masked: a denoise pass
carries a shadow of the block, in the same forward, in which half of the decided slots (alternating
by pass parity) are masked again and the rest of the block stays as it is. A checked token whose
probability there is below ``revise`` is masked in the new block and decided again by later passes.
At most ``revise_passes`` passes of a block may re-mask anything, which bounds the extra passes.
"""

from __future__ import annotations

import math

from models.modes.base import DecodeState, Plan, Score, Unmask, Verify, unmask_changes
from models.segments import bidirectional_segment, causal_segment


class DiffusionState(DecodeState):
    mode = "diffusion"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.block: list[int] = []
        self.steps = 0
        self.schedule: list[int] = []
        self.block_done = False
        self.decided: set[int] = set()  # slots of the block committed by its denoise passes (revisable)
        self.revisions_left = self.params.revise_passes if self.params.revise is not None else 0

    def _start_block(self, seed: int, scores: list[Score] | None) -> list[int]:
        self._set_block([seed] + [self.mask_id] * (self.block_length - 1), masked=self.block_length - 1)
        self.block_scores[0] = scores[0] if scores else None
        return []

    def _set_block(self, block: list[int], masked: int) -> None:
        """Denoise ``block`` next; without a threshold, ``masked`` slots are spread over the step schedule."""
        self.block = block
        self.block_scores: list[Score | None] = [None] * len(block)  # with logprobs: each decided slot's
        self.decided = set()
        self.steps = 0
        total_steps = self.params.max_steps or self.block_length
        base, extra = divmod(masked, total_steps)
        self.schedule = [base + (1 if i < extra else 0) for i in range(total_steps)]
        self.block_done = self.mask_id not in self.block[: self.needed]

    @property
    def needed(self) -> int:
        """Leading slots of the block that become output (the others are decoded, never emitted)."""
        return min(len(self.block), self.remaining)

    def after_prefill(self, token: int, scores: list[Score] | None) -> list[int]:
        return self._start_block(token, scores)

    def pending_output(self) -> list[int]:
        return self.block[: self.needed] if self.block_done else []

    def plan_decode(self) -> Plan:
        start = self.cached_len
        if self.block_done:
            return Plan([causal_segment(self.block, start, write=True, logit_rows=[self.block_length - 1])], Verify())
        least = self._least_count(self.block.count(self.mask_id))
        work = Unmask(self.block, self.params.threshold, least)
        masked = [i for i, t in enumerate(self.block) if t == self.mask_id]
        segments = [bidirectional_segment(self.block, start, logit_rows=masked)]  # nothing reads the others'
        checked = [i for i in sorted(self.decided) if i % 2 == self.steps % 2] if self.revisions_left else []
        if checked:  # the shadow: the block with the checked slots masked again, read at those slots
            shadow = [self.mask_id if i in checked else t for i, t in enumerate(self.block)]
            segments.append(bidirectional_segment(shadow, start, logit_rows=checked))
            work.revise, work.revisable = self.params.revise, checked
        return Plan(segments, work)

    def advance_decode(self, plan: Plan, result: list[int]) -> list[int]:
        self.nfe += 1
        if self.block_done:
            return self._commit(result[1], plan.work.scores)
        self._denoised(plan.work, result)
        return []

    def _denoised(self, work: Unmask, after: list[int]) -> None:
        """Take a denoise pass's block: note what it decided (and the scores of what it drew there) and
        re-masked, and whether the block is done."""
        committed, remasked = unmask_changes(work.block, after, self.mask_id)
        if work.scores is not None:
            for i in committed:
                self.block_scores[i] = work.scores[i]
        self.decided |= set(committed)
        if remasked:
            self.decided -= set(remasked)
            self.revisions_left -= 1
        self.block = after
        self.steps += 1
        self._check_block_done()

    def _least_count(self, n_masked: int) -> int | None:
        """Slots this pass must commit whatever the threshold says: the step schedule without a
        threshold, enough to finish within ``max_steps`` with one, else none (at least one always)."""
        if self.params.threshold is None:
            return self.schedule[self.steps] if self.steps < len(self.schedule) else n_masked
        if self.params.max_steps is not None:
            return math.ceil(n_masked / max(self.params.max_steps - self.steps, 1))
        return None

    def _check_block_done(self) -> None:
        """After a denoise pass (as the reference, an EOS seed still costs one pass)."""
        needed = self.block[: self.needed]
        if self.mask_id not in needed:
            self.block_done = True
        else:
            stop = next((i for i, t in enumerate(needed) if t in self.stop_ids), None)
            self.block_done = stop is not None and self.mask_id not in needed[:stop]

    def _commit(self, seed: int, scores: list[Score] | None) -> list[int]:
        self.cached_len += self.block_length
        emitted = self.emit(self.block[: self.needed], self.block_scores[: self.needed])
        if not self.finished:
            self._start_block(seed, scores)
        return emitted
