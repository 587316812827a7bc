"""Latency-tier routing: pick the model size, decoding mode and block length for a request
(ARCHITECTURE.md §5).

Pure functions over replica statistics, so they can be unit-tested on synthetic numbers. The cost
model, per *option* (a mode at a block length, models/engine/costs.py): a step carrying one request
of the option costs ``step_s``, each further request in flight adds ``per_request_s``, and the
option emits ``tpf`` tokens per forward. ``triserve calibrate`` measures the three on the device
and live traffic refreshes them; an option without figures falls back on the replica's live fit of
step time = ``fixed + per_token * query tokens`` (a request in mode m puts ``q_m`` query tokens in
each forward) and a TPF of 1. The prediction assumes the batch the request joins runs in the
option being considered (the router makes the same choice for the requests around it), so with n
requests in flight the time per output token is ``(step_s + per_request_s * n) / tpf``. At low
load the lone step and the TPF decide (self-speculation wins where its drafts are accepted); at
high concurrency ``per_request_s`` dominates and an option that puts L or L(b+1) query tokens into
every forward (quadratic with b branches) loses to AR. Where the replica makes speculative requests
take AR steps in a crowded batch (``speculation_max_batch``, models/engine/costs.py::may_speculate),
a speculative option is predicted as AR there; ties go to the option fastest alone, which gains
when the batch thins during the request.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field, replace

from models.engine.costs import OptionStats, may_speculate, split_option
from models.modes import SPECULATIVE_MODES
from models.modes.quadratic_spec import DEFAULT_BRANCHES

# The modes ``auto`` chooses among: those whose output is AR's (the same tokens at temperature 0, AR's
# distribution above it), so that routing changes the speed of an answer and never the answer.
# Diffusion commits tokens AR would not have chosen; a client asks for it by name.
ROUTABLE_MODES = ("ar", "linear_spec", "quadratic_spec")
EXPLORE_SLOWDOWN = 3.0  # exploration tries no option predicted slower than this times the choice


@dataclass(frozen=True)
class TierTarget:
    """Latency targets of a tier in seconds (inf: no target)."""

    ttft: float = math.inf
    tpot: float = math.inf


@dataclass
class ReplicaStats:
    """What one replica of a model looks like (the aggregate over its replicas, per replica)."""

    fixed_step_s: float  # cost of a step that carries no tokens (weight reads, launch overhead)
    per_token_s: float  # added cost per query token in a step
    waiting: int = 0  # requests queued for admission
    running: int = 0
    options: dict[str, OptionStats] = field(default_factory=dict)  # calibrated and live, per option
    prefill_chunk: int = 256
    speculation_max_batch: int | str | None = None  # the replica's rule for crowded speculation (None: none)


@dataclass(frozen=True)
class Candidate:
    model: str
    size: float  # parameters: bigger is preferred when it meets the targets
    stats: ReplicaStats
    options: tuple[str, ...]  # the options the request may be decoded in (option keys)


@dataclass(frozen=True)
class Decision:
    model: str
    option: str
    ttft: float
    tpot: float
    meets_targets: bool
    explored: bool = False  # chosen to refresh its figures, not because it is predicted best
    lone_tpot: float = 0.0  # time per output token were the request alone (breaks ties)
    crowded_out: bool = False  # a speculative option whose request would take AR steps at this load

    @property
    def mode(self) -> str:
        return split_option(self.option)[0]

    @property
    def block_length(self) -> int | None:
        return split_option(self.option)[1]


def query_tokens(mode: str, block_length: int) -> float:
    """Query tokens a request adds to each forward, averaged over its cycle."""
    if mode == "ar":
        return 1.0
    if mode == "quadratic_spec":  # the verify block and its default number of branches
        return block_length * (min(DEFAULT_BRANCHES, block_length) + 1)
    return float(block_length)  # diffusion steps, drafts and verifies are all one block


def crowded_out(candidate: Candidate, option: str) -> bool:
    """Whether one more request in ``option`` would take AR steps in the batch it joins (the replica's
    rule for crowded speculation, ``speculation_max_batch``)."""
    s = candidate.stats
    requests = round(s.running + s.waiting) + 1
    return split_option(option)[0] in SPECULATIVE_MODES and not may_speculate(
        s.speculation_max_batch, s.options.get(option), s.options.get("ar"), requests
    )


def predict(candidate: Candidate, option: str, prompt_tokens: int) -> tuple[float, float]:
    """(time to first token, time per output token) for one more request in ``option``."""
    s = candidate.stats
    mode, block = split_option(option)
    if crowded_out(candidate, option):
        return predict(candidate, "ar", prompt_tokens)
    figures = s.options.get(option) or OptionStats()
    q = query_tokens(mode, block or 1)
    lone = figures.step_s if figures.step_s is not None else s.fixed_step_s + s.per_token_s * q
    per_request = figures.per_request_s if figures.per_request_s is not None else s.per_token_s * q
    decode_step = lone + per_request * s.running
    tpot = decode_step / (figures.tpf or 1.0)
    chunks = max(1, math.ceil(prompt_tokens / s.prefill_chunk))
    prefill_step = decode_step + s.per_token_s * min(prompt_tokens, s.prefill_chunk)
    queue = s.waiting * decode_step * 2  # each request queued ahead needs a few steps to be admitted
    ttft = queue + chunks * prefill_step + decode_step
    return ttft, tpot


def evaluate(target: TierTarget, candidates: list[Candidate], prompt_tokens: int) -> list[Decision]:
    """Every (model, option) with its predicted latencies, largest model first."""
    if not candidates:
        raise ValueError("no model to route to")
    options = []
    for cand in sorted(candidates, key=lambda c: -c.size):
        alone = replace(cand, stats=replace(cand.stats, running=0, waiting=0))
        for option in cand.options:
            ttft, tpot = predict(cand, option, prompt_tokens)
            meets = ttft <= target.ttft and tpot <= target.tpot
            lone, crowded = predict(alone, option, 0)[1], crowded_out(cand, option)
            options.append(Decision(cand.model, option, ttft, tpot, meets, lone_tpot=lone, crowded_out=crowded))
    return options


def best(options: list[Decision]) -> Decision:
    """The largest model with an option that meets the tier; within it, the fastest such option.

    When nothing meets the targets, the option with the lowest time per output token. Ties (a
    speculative option predicted as AR in a crowded batch) go to the option fastest alone.
    """

    def fastest(d: Decision) -> tuple[float, float]:
        return d.tpot, d.lone_tpot

    for model in dict.fromkeys(d.model for d in options):  # largest first
        meeting = [d for d in options if d.model == model and d.meets_targets]
        if meeting:
            return min(meeting, key=fastest)
    return min(options, key=fastest)


def explore(
    chosen: Decision, options: list[Decision], samples: dict[str, int], fraction: float, rng: random.Random
) -> Decision:
    """With probability ``fraction``, another option of the chosen model instead: the one with the
    fewest live observations (so each gets its turn), among those meeting the tier when the chosen
    one does, predicted at most ``EXPLORE_SLOWDOWN`` times its time per output token, and not crowded
    out. Without this, an option predicted worse is never measured again, and a stale or
    uncalibrated figure would never be corrected; without the bound, at high load one explored
    request in a 32-token quadratic cycle (eight times AR's predicted cost there) slowed every
    request batched with it. A crowded-out option would measure nothing of its own (its request
    takes AR steps, and a crowd's TPF is not the option's), only cost the batch its cycles where the
    crowd thins."""
    if fraction <= 0 or rng.random() >= fraction:
        return chosen
    others = [
        d
        for d in options
        if d.model == chosen.model
        and d.option != chosen.option
        and (d.meets_targets or not chosen.meets_targets)
        and d.tpot <= EXPLORE_SLOWDOWN * chosen.tpot
        and not d.crowded_out
    ]
    if not others:
        return chosen
    fewest = min(samples.get(d.option, 0) for d in others)
    pick = rng.choice([d for d in others if samples.get(d.option, 0) == fewest])
    return replace(pick, explored=True)
