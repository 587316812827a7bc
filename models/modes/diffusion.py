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

import torch

from models.modes.base import DecodeState
from models.sampling import gumbel_pick, without_token
from models.segments import Segment, bidirectional_segment, causal_segment


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
        self.block_done = False
        masked = self.block_length - 1
        total_steps = self.params.max_steps or self.block_length
        base, extra = divmod(masked, total_steps)
        self.schedule = [base + (1 if i < extra else 0) for i in range(total_steps)]
        self.block_done = self.mask_id not in self.block[: min(self.block_length, self.remaining)]
        return []

    def after_prefill(self, last_logits: torch.Tensor) -> list[int]:
        return self._start_block(self.choose(last_logits))

    def plan_decode(self) -> list[Segment]:
        start = self.cached_len
        if self.block_done:
            return [causal_segment(self.block, start, write=True, logit_rows=[self.block_length - 1])]
        return [bidirectional_segment(self.block, start, adapter=False)]

    def advance_decode(self, logits: list[torch.Tensor]) -> list[int]:
        self.nfe += 1
        if self.block_done:
            return self._commit(logits[0][-1])
        self._denoise(logits[0])
        return []

    # ----- denoising -------------------------------------------------------------------------
    def _denoise(self, logits: torch.Tensor) -> None:
        masked = torch.tensor([t == self.mask_id for t in self.block])
        candidates = gumbel_pick(without_token(logits, self.mask_id), self.temperature, self.generator)
        confidence = torch.softmax(logits.double(), dim=-1).gather(-1, candidates[:, None]).squeeze(-1)
        confidence = torch.where(masked, confidence, torch.full_like(confidence, float("-inf")))
        n_masked = int(masked.sum())
        threshold = self.params.threshold
        if threshold is None:
            count = self.schedule[self.steps] if self.steps < len(self.schedule) else n_masked
        else:
            count = max(1, int((confidence >= threshold).sum()))
            if self.params.max_steps is not None:  # finish the block within max_steps passes
                count = max(count, math.ceil(n_masked / max(self.params.max_steps - self.steps, 1)))
        count = min(max(count, 1), n_masked)
        chosen = torch.topk(confidence, count).indices.tolist()
        for i in chosen:
            self.block[i] = int(candidates[i])
        self.steps += 1
        self._check_block_done()

    def _check_block_done(self) -> None:
        """After a denoise pass (as the reference, an EOS seed still costs one pass)."""
        needed = min(self.block_length, self.remaining)
        if self.mask_id not in self.block[:needed]:
            self.block_done = True
        elif self.eos_id is not None and self.eos_id in self.block:
            first_eos = self.block.index(self.eos_id)
            self.block_done = self.mask_id not in self.block[:first_eos]

    def _commit(self, last_logits: torch.Tensor) -> list[int]:
        self.cached_len += self.block_length
        needed = min(self.block_length, self.remaining)
        emitted = self.emit(self.block[:needed])
        if not self.finished:
            self._start_block(self.choose(last_logits))
        return emitted
