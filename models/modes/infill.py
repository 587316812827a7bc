"""Infilling: block diffusion of a middle of known length, with the suffix in sight.

The family is trained with block-causal attention: a noisy block sees itself bidirectionally and
the clean blocks before it, and its masked positions learn from the clean tokens of the same block
on both sides. So the suffix can be seen exactly where training showed clean tokens to masked ones:
inside the block. The last (or only) block of the middle is a window ``[r masks | suffix head]``
(r <= block length, the head filling the block, at least a quarter block of it), denoised with
the cache read-only until its r slots are decided; the middle's earlier blocks, if it is longer than
a block, are ordinary diffusion blocks (committed causally, the suffix out of their sight, as a block
never sees the blocks after it in training). The window is never committed: nothing follows it.

The middle's length is ``max_new_tokens`` exactly (an EOS ends it early); ``models.infill`` tries
several lengths and keeps the best rated middle.
"""

from __future__ import annotations

from models.modes.base import Plan, Score
from models.modes.diffusion import DiffusionState


def visible_suffix(block_length: int, middle: int, suffix_len: int) -> int:
    """Suffix tokens in the window after the last ``middle`` masked slots."""
    return min(suffix_len, max(block_length - middle, block_length // 4))


def infill_context(prompt_len: int, middle: int, block_length: int, suffix_len: int) -> int:
    """Positions an infilling request occupies: the prompt, the middle, and the suffix head its
    last window sees (that window masks the middle's last ``(middle - 1) % block_length + 1`` slots)."""
    last = (middle - 1) % block_length + 1
    return prompt_len + middle + visible_suffix(block_length, last, suffix_len)


class InfillState(DiffusionState):
    mode = "diffusion"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.suffix = list(self.params.suffix)
        self.window = False  # the current block is the last one, with the suffix head in it

    @property
    def context_needed(self) -> int:
        return infill_context(len(self.prompt), self.params.max_new_tokens, self.block_length, len(self.suffix))

    def _start_block(self, seed: int, scores: list[Score] | None) -> list[int]:
        middle = self.remaining
        if middle > self.block_length:  # an earlier block of the middle: plain diffusion
            return super()._start_block(seed, scores)
        head = self.suffix[: visible_suffix(self.block_length, middle, len(self.suffix))]
        self.window = True
        self._set_block([self.mask_id] * middle + head, masked=middle)  # the AR seed cannot see the suffix
        return []

    def advance_decode(self, plan: Plan, result: list[int]) -> list[int]:
        if not self.window:
            return super().advance_decode(plan, result)
        self.nfe += 1
        self._denoised(plan.work, result)
        return self.emit(self.block[: self.needed], self.block_scores[: self.needed]) if self.block_done else []
