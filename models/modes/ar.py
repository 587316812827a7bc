"""Autoregressive decoding: one causal token per forward."""

from __future__ import annotations

from models.modes.base import DecodeState, Plan, Score, ar_step


class ARState(DecodeState):
    """NFE counts sampled tokens (the reference's accounting): the prefill gives the first one."""

    mode = "ar"

    def after_prefill(self, token: int, scores: list[Score] | None) -> list[int]:
        self.nfe += 1
        return self.emit([token], scores)

    def plan_decode(self) -> Plan:
        return ar_step(self.tokens[-1], self.cached_len)

    def advance_decode(self, plan: Plan, result: list[int]) -> list[int]:
        self.cached_len += 1
        self.nfe += 1
        return self.emit([result[1]], plan.work.scores)
