"""Continuous-batching engine around one model (Ray-free; the model-server replicas drive it).

Requests join and leave between steps. Each step collects the segments of every scheduled
request (any mix of prefill chunks, AR tokens, diffusion passes, drafts, verifies and quadratic
cycles), runs one packed forward through ``models.runner.run_step`` and advances every request.
KV pages are budgeted at admission for a request's worst case (prompt + max_new_tokens + one
block of speculative overshoot), so a running request never runs out of cache: a request waits
while the pool is committed to others, and one that could never fit is rejected at once.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from dataclasses import dataclass, field

from models.model import TriModeModel
from models.modes import DecodeParams, DecodeState, kv_tokens_needed, make_state
from models.runner import run_step
from models.segments import PromptEmbeds


class RequestRejected(ValueError):
    """A request that this engine can never serve (too long for the KV pool or the context)."""


@dataclass
class RequestStats:
    arrival: float
    first_token: float | None = None
    finished: float | None = None

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.arrival


@dataclass
class Request:
    request_id: str
    state: DecodeState
    pages: int  # KV pages budgeted for the worst case
    seq_id: int
    stats: RequestStats
    mode: str


@dataclass
class StepOutput:
    """What a step produced for one request (with its decoding statistics)."""

    request_id: str
    new_tokens: list[int]
    finished: bool
    finish_reason: str | None
    nfe: int
    tokens: int  # emitted so far
    ttft: float | None
    accepted_lengths: list[int]

    @property
    def tpf(self) -> float:
        return self.tokens / self.nfe if self.nfe else 0.0


@dataclass
class StepCost:
    """Least-squares fit of step time = fixed + per_token * tokens over recent steps."""

    window: deque = field(default_factory=lambda: deque(maxlen=128))

    def add(self, tokens: int, seconds: float) -> None:
        self.window.append((tokens, seconds))

    def fit(self) -> tuple[float, float] | None:
        if len(self.window) < 4:
            return None
        n = len(self.window)
        sx = sum(t for t, _ in self.window)
        sy = sum(s for _, s in self.window)
        sxx = sum(t * t for t, _ in self.window)
        sxy = sum(t * s for t, s in self.window)
        var = n * sxx - sx * sx
        if var <= 0:  # every step had the same size: attribute it all to the fixed cost
            return sy / n, 0.0
        per_token = max((n * sxy - sx * sy) / var, 0.0)
        return max((sy - per_token * sx) / n, 0.0), per_token


@dataclass
class EngineStats:
    """Live numbers the router and the metrics read."""

    running: int = 0
    waiting: int = 0
    pool_used_pages: int = 0
    pool_pages: int = 0
    steps: int = 0
    step_time_ema: dict[str, float] = field(default_factory=dict)  # seconds per forward, per mode
    tpf_ema: dict[str, float] = field(default_factory=dict)  # tokens per forward, per mode
    batch_tokens: int = 0  # query tokens in the last step
    cost: StepCost = field(default_factory=StepCost)

    @property
    def pool_usage(self) -> float:
        return self.pool_used_pages / self.pool_pages if self.pool_pages else 0.0


class Engine:
    """Schedules requests onto one model and one paged KV pool."""

    def __init__(
        self,
        model: TriModeModel,
        *,
        num_pages: int = 512,
        page_size: int = 16,
        max_running: int = 64,
        max_step_tokens: int = 4096,
        prefill_chunk: int = 256,
        ema: float = 0.2,
    ) -> None:
        self.model = model
        self.cache = model.new_cache(num_pages, page_size)
        self.max_running = max_running
        self.max_step_tokens = max_step_tokens
        self.prefill_chunk = prefill_chunk
        self.ema = ema
        self.waiting: deque[Request] = deque()
        self.running: dict[str, Request] = {}
        self._budgeted_pages = 0
        self._seq_ids = itertools.count()
        self.stats = EngineStats(pool_pages=num_pages)

    # ----- requests ------------------------------------------------------------------------------
    def add_request(
        self, request_id: str, prompt: list[int], params: DecodeParams, embeds: PromptEmbeds | None = None
    ) -> None:
        """Queue a request; raises RequestRejected if it can never fit, ValueError on bad params."""
        self.submit(self.prepare(request_id, prompt, params, embeds))

    def submit(self, request: Request) -> None:
        """Queue a prepared request (call from the thread that steps the engine)."""
        if request.request_id in self.running or any(r.request_id == request.request_id for r in self.waiting):
            raise ValueError(f"duplicate request id {request.request_id}")
        self.waiting.append(request)
        self._refresh_stats()

    def prepare(
        self, request_id: str, prompt: list[int], params: DecodeParams, embeds: PromptEmbeds | None = None
    ) -> Request:
        """Validate a request without touching the engine's queues (safe from any thread).

        ``embeds``: a VLM request's image embeddings, which its prefill chunks carry."""
        params = DecodeParams(**{**params.__dict__, "prefill_chunk": params.prefill_chunk or self.prefill_chunk})
        state = make_state(prompt, params, self.model.config, embeds)
        tokens = kv_tokens_needed(len(prompt), params, self.model.config.block_size)
        limit = self.model.config.max_position_embeddings
        if len(prompt) + params.max_new_tokens > limit:
            raise RequestRejected(
                f"prompt ({len(prompt)} tokens) plus max_tokens ({params.max_new_tokens}) exceeds the model's "
                f"context of {limit} tokens"
            )
        pages = self.cache.pages_for(tokens)
        if pages > self.cache.num_pages:
            raise RequestRejected(
                f"request needs {tokens} tokens of KV cache; the pool holds {self.cache.capacity_tokens}"
            )
        stats = RequestStats(arrival=time.monotonic())
        return Request(request_id, state, pages, next(self._seq_ids), stats, params.mode)

    def cancel(self, request_id: str) -> bool:
        """Drop a request (client gone); its pages return to the pool at once."""
        for request in list(self.waiting):
            if request.request_id == request_id:
                self.waiting.remove(request)
                self._refresh_stats()
                return True
        request = self.running.pop(request_id, None)
        if request is None:
            return False
        self._release(request)
        return True

    def _release(self, request: Request) -> None:
        if request.seq_id in self.cache:
            self.cache.free(request.seq_id)
        self._budgeted_pages -= request.pages
        self._refresh_stats()

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ----- scheduling ------------------------------------------------------------------------
    def _admit(self) -> None:
        while self.waiting and len(self.running) < self.max_running:
            request = self.waiting[0]
            if self._budgeted_pages + request.pages > self.cache.num_pages:
                break  # first come, first served: later requests wait behind it
            self.waiting.popleft()
            self._budgeted_pages += request.pages
            self.cache.add(request.seq_id)
            self.running[request.request_id] = request

    def _schedule(self) -> list[tuple[Request, list]]:
        """Decoding requests first (they are latency-bound), then prefill chunks within the budget."""
        chosen, budget = [], self.max_step_tokens
        ordered = sorted(self.running.values(), key=lambda r: r.state.prefilling)
        for request in ordered:
            segments = request.state.plan()
            size = sum(len(s) for s in segments)
            if chosen and size > budget:
                continue
            chosen.append((request, segments))
            budget -= size
        return chosen

    def step(self) -> list[StepOutput]:
        """Admit what fits, run one forward over the scheduled requests, report their new tokens."""
        self._admit()
        scheduled = self._schedule()
        if not scheduled:
            return []
        start = time.monotonic()
        emitted = run_step(
            self.model,
            self.cache,
            [(r.seq_id, r.state) for r, _ in scheduled],
            [segments for _, segments in scheduled],
        )
        now = time.monotonic()
        elapsed = now - start
        self.stats.batch_tokens = sum(len(seg) for _, segments in scheduled for seg in segments)
        self.stats.cost.add(self.stats.batch_tokens, elapsed)
        for mode in {request.mode for request, _ in scheduled}:  # once per mode, however many requests
            self._update_mode_stats(mode, elapsed)
        outputs = []
        for (request, _), tokens in zip(scheduled, emitted):
            if tokens and request.stats.first_token is None:
                request.stats.first_token = now
            state = request.state
            if state.finished:
                request.stats.finished = now
                self.running.pop(request.request_id)
                self._release(request)
                self._update_tpf(request)
            outputs.append(
                StepOutput(
                    request.request_id,
                    tokens,
                    state.finished,
                    state.finish_reason,
                    state.nfe,
                    len(state.tokens),
                    request.stats.ttft,
                    list(state.accepted_lengths),
                )
            )
        self.stats.steps += 1
        self._refresh_stats()
        return outputs

    # ----- statistics ------------------------------------------------------------------------
    def _update_mode_stats(self, mode: str, seconds: float) -> None:
        old = self.stats.step_time_ema.get(mode)
        self.stats.step_time_ema[mode] = seconds if old is None else (1 - self.ema) * old + self.ema * seconds

    def _update_tpf(self, request: Request) -> None:
        tpf = request.state.tpf
        if tpf:
            old = self.stats.tpf_ema.get(request.mode)
            self.stats.tpf_ema[request.mode] = tpf if old is None else (1 - self.ema) * old + self.ema * tpf

    def _refresh_stats(self) -> None:
        self.stats.running = len(self.running)
        self.stats.waiting = len(self.waiting)
        self.stats.pool_used_pages = self.cache.used_pages
