"""Latency-tier routing: pick the model size and decoding mode for a request (ARCHITECTURE.md §5).

A pure function over live replica statistics, so it can be unit-tested on synthetic numbers.
The cost model: one engine step costs ``fixed + per_token * tokens_in_step`` seconds (weights are
read once per step; every query token adds compute). A request in mode m puts ``q_m`` query
tokens into each forward and emits ``tpf_m`` tokens per forward. The prediction assumes the batch
the request joins runs in the mode being considered (the router makes the same choice for the
requests around it), so with n requests in flight the time per output token is
``(fixed + per_token * n * q_m) / tpf_m``. At low load the fixed cost dominates and the mode with
the highest TPF wins (self-speculation); at high concurrency the per-token cost dominates and a
mode that puts L or L(b+1) tokens into every forward (quadratic with b branches) loses to AR.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from models.modes.quadratic_spec import DEFAULT_BRANCHES

ROUTABLE_MODES = ("ar", "linear_spec", "quadratic_spec", "diffusion")
DEFAULT_TPF = {"ar": 1.0, "linear_spec": 1.0, "quadratic_spec": 1.0, "diffusion": 1.0}


@dataclass(frozen=True)
class TierTarget:
    """Latency targets of a tier in seconds (inf: no target)."""

    ttft: float = math.inf
    tpot: float = math.inf


@dataclass
class ReplicaStats:
    """What a model's replicas report (averaged over replicas by the caller)."""

    fixed_step_s: float  # cost of a step that carries no tokens (weight reads, launch overhead)
    per_token_s: float  # added cost per query token in a step
    waiting: int = 0  # requests queued for admission
    running: int = 0
    tpf: dict[str, float] = field(default_factory=dict)  # measured tokens per forward per mode
    prefill_chunk: int = 256


@dataclass(frozen=True)
class Candidate:
    model: str
    size: float  # parameters: bigger is preferred when it meets the targets
    stats: ReplicaStats
    block_length: int = 32
    modes: tuple[str, ...] = ROUTABLE_MODES


@dataclass(frozen=True)
class Decision:
    model: str
    mode: str
    ttft: float
    tpot: float
    meets_targets: bool


def query_tokens(mode: str, block_length: int) -> float:
    """Query tokens a request adds to each forward, averaged over its cycle."""
    if mode == "ar":
        return 1.0
    if mode == "quadratic_spec":  # the verify block and its default number of branches
        return block_length * (min(DEFAULT_BRANCHES, block_length) + 1)
    return float(block_length)  # diffusion steps, drafts and verifies are all one block


def predict(candidate: Candidate, mode: str, prompt_tokens: int) -> tuple[float, float]:
    """(time to first token, time per output token) for one more request in ``mode``."""
    s = candidate.stats
    q = query_tokens(mode, candidate.block_length)

    in_flight = s.running + 1
    decode_step = s.fixed_step_s + s.per_token_s * in_flight * q
    tpf = s.tpf.get(mode) or DEFAULT_TPF[mode]
    tpot = decode_step / tpf
    chunks = max(1, math.ceil(prompt_tokens / s.prefill_chunk))
    prefill_step = decode_step + s.per_token_s * min(prompt_tokens, s.prefill_chunk)
    queue = s.waiting * decode_step * 2  # each request queued ahead needs a few steps to be admitted
    ttft = queue + chunks * prefill_step + decode_step
    return ttft, tpot


def choose(target: TierTarget, candidates: list[Candidate], prompt_tokens: int) -> Decision:
    """The largest model with a mode that meets the tier; within it, the fastest such mode.

    When nothing meets the targets, the option with the lowest time per output token.
    """
    if not candidates:
        raise ValueError("no model to route to")
    options: list[Decision] = []
    for cand in sorted(candidates, key=lambda c: -c.size):
        for mode in cand.modes:
            ttft, tpot = predict(cand, mode, prompt_tokens)
            options.append(Decision(cand.model, mode, ttft, tpot, ttft <= target.ttft and tpot <= target.tpot))
        meeting = [d for d in options if d.model == cand.model and d.meets_targets]
        if meeting:
            return min(meeting, key=lambda d: d.tpot)
    return min(options, key=lambda d: d.tpot)
