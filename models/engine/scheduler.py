"""Which requests run in the next step, with how many prompt tokens each, and who is preempted.

Policy (one step):

1. The most urgent prefill goes first with the whole token budget: the oldest (by tier and age)
   running request that is still prefilling, or, when none is, the most urgent waiting request,
   admitted now. So every step makes progress on the oldest prefill, and a new request gets its
   first chunk in the next step however long the others' steps are.
2. Then the other running requests: first those left out of the previous step, then decoding
   requests by tier and age, then other prefills. A decode step is whole (a verify block, a
   quadratic cycle); it waits for the next step when it does not fit in what is left of the budget,
   but a request left out once always runs next time, so nothing waits more than one step for
   the budget. Prefills take chunks of what is left (at most ``prefill_chunk``).
3. Then waiting requests are admitted in tier order while the budget and ``max_running`` allow.

Before a decoding request plans its step, ``speculate(request, load)`` (the engine's policy; load:
the requests running and waiting) decides whether a speculative request may start a new cycle or
takes an AR step instead (``DecodeState.speculate``).

Tier order is ``interactive`` before ``standard`` before ``batch``, with ageing: every
``ageing_s`` seconds a request has waited since it arrived count as one tier up, so batch
requests still finish under a stream of interactive ones. Ties go to the earlier arrival.

Pages are allocated for what a step writes. When the pool runs dry, the least urgent running
request not yet in the step is preempted: its pages are freed (full ones stay in the prefix cache)
and it waits to be admitted again, when it recomputes its cache and resumes where it stopped.
Admission never preempts: a waiting request starts only when its first chunk's pages are free,
and the most urgent one is not overtaken by others while it waits for them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from models.engine.kv_manager import KVCacheManager, chain_digests
from models.modes import DecodeState, Plan

TIER_PRIORITY = {"interactive": 0, "standard": 1, "batch": 2}


@dataclass
class RequestStats:
    arrival: float
    first_token: float | None = None
    finished: float | None = None

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.arrival


@dataclass(eq=False)
class Request:
    request_id: str
    state: DecodeState
    seq_id: int
    stats: RequestStats
    priority: int = TIER_PRIORITY["standard"]
    skipped: int = 0  # consecutive steps this running request was left out of
    digests: list[bytes] = field(default_factory=list)  # prefix-cache digests of its leading full pages
    option: str | None = None  # the decoding option its costs count towards (engine/costs.py)

    @property
    def mode(self) -> str:
        return self.state.mode

    def page_digests(self, pages: int, page_size: int) -> list[bytes]:
        """Digests of the sequence's first ``pages`` pages (full, committed), each computed once."""
        if pages > len(self.digests):
            state, parent = self.state, self.digests[-1] if self.digests else b""
            new = []
            for i in range(len(self.digests), pages):
                start, stop = i * page_size, (i + 1) * page_size
                extra = state.embeds.digest(start, stop) if state.embeds is not None else b""
                new.append((state.token_at(start, stop), extra))
            self.digests += chain_digests(parent, new)
        return self.digests[:pages]


@dataclass
class SchedulerStats:
    prefix_queries: int = 0  # prompt (or resumed) tokens looked up in the prefix cache
    prefix_hits: int = 0  # of those, tokens found there (their prefill skipped)
    preemptions: int = 0


class Scheduler:
    def __init__(
        self,
        kv: KVCacheManager,
        *,
        max_running: int,
        max_step_tokens: int,
        prefill_chunk: int,
        ageing_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        speculate: Callable[[Request, int], bool] = lambda request, load: True,
    ) -> None:
        if max_step_tokens < 1 or prefill_chunk < 1 or max_running < 1:
            raise ValueError("max_step_tokens, prefill_chunk and max_running must be positive")
        self.kv = kv
        self.max_running = max_running
        self.max_step_tokens = max_step_tokens
        self.prefill_chunk = prefill_chunk
        self.ageing_s = ageing_s
        self.clock = clock
        self.speculate = speculate
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.stats = SchedulerStats()

    # ----- membership -----------------------------------------------------------------------------
    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def remove(self, request_id: str) -> Request | None:
        """Take a request out (cancelled or finished); a running one's pages return to the pool."""
        for queue in (self.waiting, self.running):
            for request in queue:
                if request.request_id == request_id:
                    queue.remove(request)
                    if request.seq_id in self.kv:
                        self.kv.free(request.seq_id)
                    return request
        return None

    def commit(self, request: Request) -> None:
        """After a step: offer the request's newly full committed pages to the prefix cache."""
        if self.kv.prefix_caching:
            state = request.state
            known = min(state.cached_len, len(state.prompt) + len(state.tokens))
            self.kv.cache_pages(request.seq_id, request.page_digests(known // self.kv.page_size, self.kv.page_size))

    # ----- one step ---------------------------------------------------------------------------------
    def _urgency(self, request: Request, now: float) -> tuple[int, float]:
        age = now - request.stats.arrival
        promoted = int(age / self.ageing_s) if self.ageing_s > 0 else 0
        return request.priority - promoted, request.stats.arrival

    def schedule(self) -> list[tuple[Request, Plan]]:
        now = self.clock()
        urgency = {id(r): self._urgency(r, now) for r in self.running + self.waiting}
        chosen: list[tuple[Request, Plan]] = []
        budget = self.max_step_tokens
        load = len(self.running) + len(self.waiting)

        def take(request: Request, must: bool, admit: bool = False) -> bool:
            nonlocal budget
            state = request.state
            if state.prefilling:
                room = budget if budget > 0 else (self.kv.page_size if must else 0)
                if room <= 0:
                    request.skipped += 1
                    return False
                plan = state.plan(min(self.prefill_chunk, room))
            else:
                state.speculate = self.speculate(request, load)
                plan = state.plan(budget)
                if not must and plan.num_tokens > budget:
                    request.skipped += 1
                    return False
            if not self._reserve(request, plan, chosen, urgency, preempt=not admit):
                request.skipped += 1
                return False
            request.skipped = 0
            chosen.append((request, plan))
            budget -= plan.num_tokens
            return True

        prefilling = [r for r in self.running if r.state.prefilling]
        first = min(prefilling, key=lambda r: urgency[id(r)]) if prefilling else None
        if first is not None:
            take(first, must=True)
        else:
            self._admit(take, urgency, must=True)
        rest = [r for r in self.running if r is not first and all(r is not c for c, _ in chosen)]
        rest.sort(key=lambda r: (r.skipped == 0, r.state.prefilling, urgency[id(r)]))
        for request in rest:
            if request in self.running:  # not preempted meanwhile
                take(request, must=request.skipped > 0)
        while budget > 0 and self._admit(take, urgency, must=False):
            pass
        return chosen

    def _admit(self, take: Callable[..., bool], urgency: dict[int, tuple[int, float]], must: bool) -> bool:
        """Start the most urgent waiting request (its prefix-cache hits, then its first chunk)."""
        if not self.waiting or len(self.running) >= self.max_running:
            return False
        by_urgency = sorted(self.waiting, key=lambda r: urgency[id(r)])
        request = next((r for r in by_urgency if not self._prefill_underway(r)), None)
        if request is None:
            return False
        state = request.state
        self.kv.add(request.seq_id)
        eligible = hits = 0
        if self.kv.prefix_caching:
            eligible = _cacheable(state)
            digests = self._digests(request)
            hits = state.cached_len = self.kv.match_prefix(request.seq_id, digests) * self.kv.page_size
        self.waiting.remove(request)
        self.running.append(request)
        if take(request, must=must, admit=True):
            self.stats.prefix_queries += eligible
            self.stats.prefix_hits += hits
            return True
        self.running.remove(request)  # its pages are not free yet: it waits, first in line
        self.kv.free(request.seq_id)
        state.cached_len = 0
        request.skipped = 0
        self.waiting.append(request)
        return False

    def _digests(self, request: Request) -> list[bytes]:
        """Digests of the request's pages that the prefix cache may hold: its full pages of the
        prompt (a prompt keeps its last token to compute: its logits give the first output token)."""
        return request.page_digests(_cacheable(request.state) // self.kv.page_size, self.kv.page_size)

    def _prefill_underway(self, request: Request) -> bool:
        """Whether a running request is prefilling pages this one could take from the prefix cache once
        they are computed (n > 1 choices, prompts with a common start): it waits for them rather than
        computing them a second time."""
        if not self.kv.prefix_caching:
            return False
        prefilling = [r for r in self.running if r.state.prefilling]
        if not prefilling:
            return False
        mine = self._digests(request)
        for other in prefilling:
            theirs = self._digests(other)
            shared = next((i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b), min(len(mine), len(theirs)))
            if shared > other.state.cached_len // self.kv.page_size:
                return True
        return False

    def _reserve(
        self,
        request: Request,
        plan: Plan,
        chosen: list[tuple[Request, Plan]],
        urgency: dict[int, tuple[int, float]],
        preempt: bool,
    ) -> bool:
        """Pages for what the plan writes, preempting less urgent requests not in this step if need be."""
        need = plan.write_extent
        while self.kv.missing_pages(request.seq_id, need) > self.kv.free_pages:
            if not preempt:
                return False
            in_step = {id(r) for r, _ in chosen} | {id(request)}
            candidates = [r for r in self.running if id(r) not in in_step]
            if not candidates:
                return False
            victim = max(candidates, key=lambda r: urgency[id(r)])
            if urgency[id(victim)] < urgency[id(request)]:
                return False  # everyone left is more urgent: this request waits instead
            self.preempt(victim)
        self.kv.reserve(request.seq_id, need)
        return True

    def preempt(self, request: Request) -> None:
        """Free a running request's cache; it waits to be admitted again and then recomputes it."""
        self.running.remove(request)
        self.kv.free(request.seq_id)
        request.state.preempt()
        request.skipped = 0
        self.waiting.append(request)
        self.stats.preemptions += 1


def _cacheable(state) -> int:
    """Leading tokens of a request to be computed that the prefix cache may hold: all but the last
    of a prompt (whose logits give the first output token), or all of a resumed request's."""
    return state.ready_len - (0 if state.started else 1)
