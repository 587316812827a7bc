"""Continuous-batching engine around one model (Ray-free; the model-server replicas drive it).

Requests join and leave between steps. Each step the scheduler picks requests and what each
contributes (any mix of prefill chunks, AR tokens, diffusion passes, drafts, verifies and
quadratic cycles), the runner runs them as one packed forward plus one batched post-processing
pass, and every request advances with its results. KV pages are allocated as requests grow;
when the pool runs dry a request is preempted and later resumes with exactly the tokens it would
have produced. Full pages of committed tokens are shared between requests with the same prefix.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from models.engine.costs import (
    OptionCosts,
    OptionStats,
    StepCost,
    effective_tpf,
    may_speculate,
    option_key,
    record_pays,
    request_option,
)
from models.engine.kv_manager import KVCacheManager
from models.engine.runner import ModelRunner
from models.engine.scheduler import TIER_PRIORITY, Request, RequestStats, Scheduler
from models.engine.step_graphs import StepGraphs
from models.modes import DecodeParams, kv_tokens_needed, make_state
from models.modes.base import Score
from models.segments import PromptEmbeds

MAX_BLOCK_LENGTH = 1024  # DecodeParams' bound: a request writes at most one block past its output


def check_speculation_max_batch(value: object) -> None:
    """``Engine``'s ``speculation_max_batch`` is "auto", None or a positive integer."""
    if not (value in (None, "auto") or (type(value) is int and value >= 1)):
        raise ValueError(f"speculation_max_batch must be 'auto', null or a positive integer, not {value!r}")


def speculation_rule(limit: int | str | None, costs: OptionCosts) -> Callable[[Request, int], bool]:
    """The scheduler's ``speculate``: whether a request may start a cycle among ``load`` requests
    (costs.may_speculate on its option's current figures), and, under "auto" with calibrated costs
    for its option and AR, whether its own recent cycles pay (``SpeculationRecord.allows`` with
    costs.record_pays). Without calibration nothing is judged (as the crowd rule demotes nothing):
    lone step times learned live are noisy, and ``models.generate`` then runs each mode as asked. A
    seeded sampled request is not judged by its own cycles: which steps speculate would then depend
    on measured step times, and at temperature > 0 that changes which random draws its tokens come
    from, so the seed would no longer reproduce them. Nor is a router exploration: it runs to
    refresh its option's figures, which AR steps would not. A closure over the figures, not a
    method of the engine: the scheduler would hold the engine in a reference cycle, and an engine
    freed only by the garbage collector keeps its KV cache (and a tensor-parallel group's shards)
    alive."""

    def speculate(request: Request, load: int) -> bool:
        state = request.state
        if not state.speculative:
            return True
        option = option_key(state.mode, state.block_length)
        spec, ar = costs.figures(option), costs.figures("ar")
        if not may_speculate(limit, spec, ar, load):
            return False
        if limit != "auto" or not (costs.calibrated(option) and costs.calibrated("ar")):
            return True
        if state.params.explored or (state.temperature > 0 and state.params.seed is not None):
            return True
        return state.record.allows(state.demoted_steps, lambda tpf: record_pays(tpf, spec, ar, load))

    return speculate


class RequestRejected(ValueError):
    """A request that this engine can never serve (too long for the KV pool or the context)."""


@dataclass
class StepOutput:
    """What one or more steps produced for one request: deltas, plus its running statistics."""

    request_id: str
    new_tokens: list[int]
    finished: bool
    finish_reason: str | None
    nfe: int
    tokens: int  # emitted so far
    ttft: float | None
    new_accepted: list[int]  # tokens emitted per speculative cycle, for the cycles of these steps
    trace: list[dict] = field(default_factory=list)  # with params.trace: what each of these forwards did
    new_logprobs: list[Score] = field(default_factory=list)  # with params.logprobs: new_tokens' scores

    @property
    def tpf(self) -> float:
        return self.tokens / self.nfe if self.nfe else 0.0

    def merge(self, later: StepOutput) -> StepOutput:
        """This output followed by a later one of the same request, as one."""
        return StepOutput(
            self.request_id,
            self.new_tokens + later.new_tokens,
            later.finished,
            later.finish_reason,
            later.nfe,
            later.tokens,
            later.ttft if later.ttft is not None else self.ttft,
            self.new_accepted + later.new_accepted,
            self.trace + later.trace,
            self.new_logprobs + later.new_logprobs,
        )


@dataclass
class EngineStats:
    """Live numbers the router and the metrics read."""

    running: int = 0
    waiting: int = 0
    pool_used_pages: int = 0
    pool_pages: int = 0
    steps: int = 0
    batch_tokens: int = 0  # query tokens in the last step
    prefix_queries: int = 0  # tokens looked up in the prefix cache ...
    prefix_hits: int = 0  # ... and found there
    preemptions: int = 0
    cost: StepCost = field(default_factory=StepCost)
    options: OptionCosts = field(default_factory=OptionCosts)  # per mode and block length (engine/costs.py)

    @property
    def pool_usage(self) -> float:
        return self.pool_used_pages / self.pool_pages if self.pool_pages else 0.0


class Engine:
    """Schedules requests onto one model and one paged KV pool."""

    def __init__(
        self,
        model,
        *,
        num_pages: int = 512,
        page_size: int = 16,
        max_running: int = 64,
        max_step_tokens: int = 2048,
        prefill_chunk: int = 512,
        prefix_caching: bool = True,
        priority_ageing_s: float = 5.0,
        priors: dict[str, OptionStats] | None = None,
        speculation_max_batch: int | str | None = "auto",
        cuda_graphs: bool = False,
    ) -> None:
        """``speculation_max_batch``: above this many requests (running and waiting) speculative
        requests take AR steps instead of new cycles (vLLM's ``disable_by_batch_size``); "auto":
        wherever the option's figures (``priors``, refreshed live) predict speculation to emit fewer
        tokens per second than AR for that many requests, and also, for one request, while its own
        recent cycles predict less than 0.9x AR's (``SpeculationRecord``); None: never.
        ``cuda_graphs``: on a CUDA model, steps whose requests all plan segments of one shape (AR
        tokens, drafts, verifies, quadratic cycles, denoise passes) replay CUDA graphs, those of AR
        decodes captured here (``models.engine.step_graphs``); ignored elsewhere."""
        check_speculation_max_batch(speculation_max_batch)
        self.model = model
        self.cache = model.new_cache(num_pages, page_size)
        longest = model.config.max_position_embeddings + MAX_BLOCK_LENGTH + 1
        self.kv = KVCacheManager(
            num_pages,
            page_size,
            max_seqs=max_running,
            max_pages_per_seq=min(num_pages, -(-longest // page_size)),
            device=model.device,
            prefix_caching=prefix_caching,
        )
        costs = OptionCosts(priors)
        self.scheduler = Scheduler(
            self.kv,
            max_running=max_running,
            max_step_tokens=max_step_tokens,
            prefill_chunk=prefill_chunk,
            ageing_s=priority_ageing_s,
            speculate=speculation_rule(speculation_max_batch, costs),
        )
        graphs = None
        if cuda_graphs and model.device.type == "cuda":
            graphs = StepGraphs(model, self.cache, self.kv, max_running)
        self.runner = ModelRunner(model, self.cache, self.kv, graphs)
        self._seq_ids = itertools.count()
        self._ids: set[str] = set()
        self.stats = EngineStats(pool_pages=num_pages, options=costs)
        self._last_step_end: float | None = None  # None: no step since the engine last idled

    # ----- requests ------------------------------------------------------------------------------
    def add_request(
        self,
        request_id: str,
        prompt: list[int],
        params: DecodeParams,
        embeds: PromptEmbeds | None = None,
        tier: str = "standard",
    ) -> Request:
        """Queue a request; raises RequestRejected if it can never fit, ValueError on bad params."""
        request = self.prepare(request_id, prompt, params, embeds, tier)
        self.submit(request)
        return request

    def prepare(
        self,
        request_id: str,
        prompt: list[int],
        params: DecodeParams,
        embeds: PromptEmbeds | None = None,
        tier: str = "standard",
    ) -> Request:
        """Validate a request without touching the engine's queues (safe from any thread).

        ``embeds``: a VLM request's image embeddings, which its prefill chunks carry. ``tier`` orders
        admission (interactive, standard, batch)."""
        if tier not in TIER_PRIORITY:
            raise ValueError(f"unknown tier {tier!r}; expected one of {', '.join(TIER_PRIORITY)}")
        state = make_state(prompt, params, self.model.config, embeds)
        limit = self.model.config.max_position_embeddings
        if state.context_needed > limit:
            seen = state.context_needed - len(prompt) - params.max_new_tokens
            suffix = f", plus the {seen} suffix tokens it sees," if seen else ""
            raise RequestRejected(
                f"prompt ({len(prompt)} tokens) plus max_tokens ({params.max_new_tokens}){suffix} "
                f"exceeds the model's context of {limit} tokens"
            )
        tokens = kv_tokens_needed(len(prompt), params, self.model.config.block_size)
        if self.kv.pages_for(tokens) > self.kv.num_pages:
            raise RequestRejected(
                f"request needs {tokens} tokens of KV cache; the pool holds {self.kv.capacity_tokens}"
            )
        stats = RequestStats(arrival=time.monotonic())
        option = request_option(params, self.model.config.block_size)
        return Request(request_id, state, next(self._seq_ids), stats, TIER_PRIORITY[tier], option=option)

    def submit(self, request: Request) -> None:
        """Queue a prepared request (call from the thread that steps the engine)."""
        if request.request_id in self._ids:
            raise ValueError(f"duplicate request id {request.request_id}")
        if not self.has_work:  # the engine idled: the time since its last step was not a step's
            self._last_step_end = None
        self._ids.add(request.request_id)
        self.scheduler.add(request)
        self._refresh_stats()

    def cancel(self, request_id: str) -> bool:
        """Drop a request (client gone); its pages return to the pool at once."""
        request = self.scheduler.remove(request_id)
        if request is None:
            return False
        self._ids.discard(request_id)
        self._refresh_stats()
        return True

    def cancel_all(self) -> None:
        """Drop every running and waiting request (a step failed: none of them can go on)."""
        for request_id in list(self.running) + [r.request_id for r in self.waiting]:
            self.cancel(request_id)

    @property
    def has_work(self) -> bool:
        return bool(self.scheduler.waiting or self.scheduler.running)

    @property
    def running(self) -> dict[str, Request]:
        return {r.request_id: r for r in self.scheduler.running}

    @property
    def waiting(self) -> list[Request]:
        return list(self.scheduler.waiting)

    # ----- stepping ------------------------------------------------------------------------------
    def step(self) -> list[StepOutput]:
        """Run one step; report the requests that emitted tokens or finished."""
        scheduled = self.scheduler.schedule()
        if not scheduled:
            self._refresh_stats()
            return []
        prefilling = any(r.state.prefilling for r, _ in scheduled)
        start = time.monotonic()
        results = self.runner.execute([(r.seq_id, plan, r.state) for r, plan in scheduled])
        now = time.monotonic()
        elapsed = now - start
        self.stats.batch_tokens = sum(plan.num_tokens for _, plan in scheduled)
        self.stats.cost.add(self.stats.batch_tokens, elapsed)
        options = {"ar" if plan.demoted else request.option for request, plan in scheduled}
        if not prefilling and len(options) == 1 and None not in options:
            # from the previous step's end: what the driver spent delivering its outputs counts too
            since = start if self._last_step_end is None else self._last_step_end
            self.stats.options.observe_step(options.pop(), len(scheduled), now - since)
        self._last_step_end = now
        for request, plan in scheduled:
            if plan.demoted and request.option is not None:
                self.stats.options.observe_demoted(request.option)
        outputs = []
        for (request, plan), result in zip(scheduled, results):
            state = request.state
            cycles, before = len(state.accepted_lengths), len(state.tokens)
            tokens = state.advance(plan, result)
            self.kv.set_length(request.seq_id, state.cached_len)
            self.scheduler.commit(request)
            if tokens and request.stats.first_token is None:
                request.stats.first_token = now
            if state.finished:
                request.stats.finished = now
                self.scheduler.remove(request.request_id)
                self._ids.discard(request.request_id)
                # its TPF counts unless a crowd made it take AR steps (then it is the crowd's, not the
                # option's); AR steps it took because its own cycles did not pay are how the option runs
                if request.option is not None and state.tpf and state.demoted_steps == state.held_steps:
                    costs = self.stats.options
                    spec, ar = costs.figures(request.option), costs.figures("ar")
                    costs.observe_finished(
                        request.option, effective_tpf(len(state.tokens), state.nfe, state.held_steps, spec, ar)
                    )
            trace = state.trace or []  # handed out with this output, so the state keeps only new events
            if trace:
                state.trace = []
            if tokens or state.finished or trace:
                outputs.append(
                    StepOutput(
                        request.request_id,
                        tokens,
                        state.finished,
                        state.finish_reason,
                        state.nfe,
                        len(state.tokens),
                        request.stats.ttft,
                        state.accepted_lengths[cycles:],
                        trace,
                        state.logprobs[before:] if state.logprobs is not None else [],
                    )
                )
        self.stats.steps += 1
        self._refresh_stats()
        return outputs

    # ----- statistics ------------------------------------------------------------------------
    def _refresh_stats(self) -> None:
        self.stats.running = len(self.scheduler.running)
        self.stats.waiting = len(self.scheduler.waiting)
        self.stats.pool_used_pages = self.kv.used_pages
        self.stats.prefix_queries = self.scheduler.stats.prefix_queries
        self.stats.prefix_hits = self.scheduler.stats.prefix_hits
        self.stats.preemptions = self.scheduler.stats.preemptions
