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

import kernels
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
        n_masked = self.block.count(self.mask_id)
        if self.temperature <= 0:
            blocks = torch.tensor([self.block], device=logits.device)
            least = self._least_count(n_masked)
            least_t = None if least is None else torch.tensor([least], device=logits.device)
            kernels.unmask(blocks, logits[None], self.mask_id, self.params.threshold, least_t)
            self.block = blocks[0].tolist()
        else:
            self._denoise_sampled(logits.cpu(), n_masked)
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

    def _denoise_sampled(self, logits: torch.Tensor, n_masked: int) -> None:
        """The greedy rule of ``kernels.unmask`` over Gumbel-max candidates (as the reference samples)."""
        masked = torch.tensor([t == self.mask_id for t in self.block])
        candidates = gumbel_pick(without_token(logits, self.mask_id), self.temperature, self.generator)
        confidence = torch.softmax(logits.double(), dim=-1).gather(-1, candidates[:, None]).squeeze(-1)
        confidence = torch.where(masked, confidence, torch.full_like(confidence, float("-inf")))
        threshold = self.params.threshold
        count = 0 if threshold is None else int((confidence >= threshold).sum())
        count = min(max(count, self._least_count(n_masked) or 0, 1), n_masked)
        for i in torch.topk(confidence, count).indices.tolist():
            self.block[i] = int(candidates[i])

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
