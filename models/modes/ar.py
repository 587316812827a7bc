"""Autoregressive decoding: one causal token per forward."""

from __future__ import annotations

import torch

from models.modes.base import DecodeState
from models.segments import Segment, causal_segment


class ARState(DecodeState):
    """NFE counts sampled tokens (the reference's accounting): the prefill gives the first one."""

    mode = "ar"

    def after_prefill(self, last_logits: torch.Tensor) -> list[int]:
        self.nfe += 1
        return self.emit([self.choose(last_logits)])

    def plan_decode(self) -> list[Segment]:
        return [causal_segment([self.tokens[-1]], self.cached_len, write=True)]

    def advance_decode(self, logits: list[torch.Tensor]) -> list[int]:
        self.cached_len += 1
        self.nfe += 1
        return self.emit([self.choose(logits[0][0])])
