"""Block diffusion: parallel unmasking of a block by confidence, then one causal commit pass.

A block starts as ``[seed, M x (L-1)]`` where the seed is the AR prediction after the prefix.
Each denoise pass (bidirectional, cache read-only) commits the most confident masked slot plus
every masked slot whose confidence reaches the threshold; the block ends when no mask is left
(among the slots still needed) or when an EOS is committed with no mask before it. A causal pass
over the finished block then writes its keys/values and yields the next seed.
NFE = denoise passes + one commit pass per block (the prompt prefill is not counted).
"""

from __future__ import annotations

import math

from models.modes.base import DecodeState, Plan, Unmask, Verify
from models.segments import bidirectional_segment, causal_segment


class DiffusionState(DecodeState):
    mode = "diffusion"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.block: list[int] = []
        self.steps = 0
        self.schedule: list[int] = []
        self.block_done = False

    def _start_block(self, seed: int) -> list[int]:
        self.block = [seed] + [self.mask_id] * (self.block_length - 1)
        self.steps = 0
        masked = self.block_length - 1
        total_steps = self.params.max_steps or self.block_length
        base, extra = divmod(masked, total_steps)
        self.schedule = [base + (1 if i < extra else 0) for i in range(total_steps)]
        self.block_done = self.mask_id not in self.block[: min(self.block_length, self.remaining)]
        return []

    def after_prefill(self, token: int) -> list[int]:
        return self._start_block(token)

    def plan_decode(self) -> Plan:
        start = self.cached_len
        if self.block_done:
            return Plan([causal_segment(self.block, start, write=True, logit_rows=[self.block_length - 1])], Verify())
        least = self._least_count(self.block.count(self.mask_id))
        return Plan([bidirectional_segment(self.block, start)], Unmask(self.block, self.params.threshold, least))

    def advance_decode(self, plan: Plan, result: list[int]) -> list[int]:
        self.nfe += 1
        if self.block_done:
            return self._commit(result[1])
        self.block = result
        self.steps += 1
        self._check_block_done()
        return []

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
        needed = min(self.block_length, self.remaining)
        if self.mask_id not in self.block[:needed]:
            self.block_done = True
        elif self.eos_id is not None and self.eos_id in self.block:
            first_eos = self.block.index(self.eos_id)
            self.block_done = self.mask_id not in self.block[:first_eos]

    def _commit(self, seed: int) -> list[int]:
        self.cached_len += self.block_length
        needed = min(self.block_length, self.remaining)
        emitted = self.emit(self.block[:needed])
        if not self.finished:
            self._start_block(seed)
        return emitted
