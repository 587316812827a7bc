"""Asyncio fronts for the engine: requests stream through queues while the engine steps elsewhere.

``StreamFront`` is what every driver shares; ``AsyncEngine`` steps the engine on a thread of this
process, ``models.engine.engine_process.ProcessEngine`` in a process of its own. The stepping
thread runs steps back to back while there is work and sleeps otherwise; every mutation of the
engine (submit, cancel, step, a scoring pass) happens on it, so the engine needs no locks. The
event loop only moves results: it never schedules a step, so a loop busy with many streams does
not leave the model idle between steps. Each step's outputs reach their requests' queues in one
thread-safe call. A consumer slower than the engine gets the outputs of the steps it missed merged
into one (deltas concatenated), so a busy server sends fewer, larger messages rather than falling
behind. Ray-free: the model-server deployment wraps it, tests drive it directly.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from typing import Any

from models.engine.engine import Engine, EngineStats, StepOutput
from models.engine.host import EngineHost
from models.modes import DecodeParams
from models.segments import PromptEmbeds


class StreamFront:
    """What both engine drivers share: one asyncio queue per request, outputs a slow consumer missed
    merged into one message, and the least time between two messages of a stream (one for a busy
    engine, one for a lone request).

    A driver implements ``_add`` (queue a request; may raise ValueError on bad input), ``_cancel``,
    ``call`` and ``stats``, and hands outputs to ``_deliver`` from whatever thread produces them."""

    def __init__(self, stream_interval_s: float = 0.0, lone_stream_interval_s: float = 0.0) -> None:
        self.stream_interval_s = stream_interval_s
        self.lone_stream_interval_s = lone_stream_interval_s
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self.last_progress = time.monotonic()
        self.error: BaseException | None = None

    @property
    def stats(self) -> EngineStats:
        raise NotImplementedError

    def _add(
        self, request_id: str, prompt: list[int], params: DecodeParams, embeds: PromptEmbeds | None, tier: str
    ) -> None:
        raise NotImplementedError

    def _cancel(self, request_id: str) -> None:
        raise NotImplementedError

    async def call(self, fn: Callable, *args) -> Any:
        """``fn(host, *args)`` where the engine runs (``host``: models.engine.host.EngineHost), between
        steps: work that must not race one (a scoring pass, encoding images)."""
        raise NotImplementedError

    async def generate(
        self,
        request_id: str,
        prompt: list[int],
        params: DecodeParams,
        embeds: PromptEmbeds | None = None,
        tier: str = "standard",
    ) -> AsyncIterator[StepOutput]:
        """Yield the request's step outputs until it finishes; cancel it if the consumer goes away."""
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = (asyncio.get_running_loop(), queue)
        added = finished = False
        sent_at: float | None = None
        try:
            self._add(request_id, prompt, params, embeds, tier)
            added = True
            while not finished:
                item = await queue.get()
                if sent_at is not None and not isinstance(item, BaseException) and not item.finished:
                    wait = sent_at + self._interval() - time.monotonic()
                    if wait > 0:  # busy server: let this stream's next outputs join the message
                        await asyncio.sleep(wait)
                while not isinstance(item, BaseException) and not queue.empty():
                    later = queue.get_nowait()
                    item = later if isinstance(later, BaseException) else item.merge(later)
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                sent_at = time.monotonic()
        finally:
            self._queues.pop(request_id, None)
            if added and not finished:
                self._cancel(request_id)

    def _interval(self) -> float:
        """Least time between two messages of one stream: ``stream_interval_s`` while other requests
        share the engine (messages cost CPU the batch needs), ``lone_stream_interval_s`` for a lone
        request (each message costs the replica, ingress and proxy CPU, on a small machine the
        engine's own: a few milliseconds keep a stream smooth and give the engine its core back)."""
        return self.stream_interval_s if self.stats.running > 1 else self.lone_stream_interval_s

    def _deliver(self, items: list[StepOutput | BaseException], request_ids: list[str] | None = None) -> None:
        """Hand items to their requests' queues: one thread-safe call per event loop."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, Any]]] = {}
        ids = request_ids or [item.request_id for item in items]
        for request_id, item in zip(ids, items):
            entry = self._queues.get(request_id)
            if entry is not None:
                by_loop.setdefault(entry[0], []).append((entry[1], item))
        for loop, pairs in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, pairs)
            except RuntimeError:  # that loop is closed: its consumers are gone
                pass

    def _fail_streams(self, exc: BaseException) -> None:
        """Every open stream ends with ``exc``."""
        ids = list(self._queues)
        self._deliver([exc] * len(ids), ids)

    def failure(self) -> str | None:
        """Why the engine can no longer serve (None while it can)."""
        return None


class AsyncEngine(StreamFront):
    """The engine stepping on a thread of this process."""

    def __init__(
        self, engine: Engine, stream_interval_s: float = 0.0, lone_stream_interval_s: float = 0.0, vlm: Any = None
    ) -> None:
        super().__init__(stream_interval_s, lone_stream_interval_s)
        self.engine = engine
        self.host = EngineHost(engine, vlm)
        self._ops: deque[Callable[[], None]] = deque()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()

    @property
    def stats(self) -> EngineStats:
        return self.engine.stats

    def _ensure_thread(self) -> None:
        with self._start_lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
                self._thread.start()

    def _submit_op(self, op: Callable[[], None]) -> None:
        self._ops.append(op)
        self._ensure_thread()
        self._wake.set()

    def _add(
        self, request_id: str, prompt: list[int], params: DecodeParams, embeds: PromptEmbeds | None, tier: str
    ) -> None:
        request = self.engine.prepare(request_id, prompt, params, embeds, tier)  # raises on bad input, before queueing

        def submit() -> None:
            try:
                self.engine.submit(request)
            except ValueError as exc:  # a duplicate id: that request fails, not the others
                self._deliver([exc], [request_id])

        self._submit_op(submit)

    def _cancel(self, request_id: str) -> None:
        self._submit_op(lambda: self.engine.cancel(request_id))

    async def call(self, fn: Callable, *args) -> Any:
        future: Future = Future()

        def op() -> None:
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(self.host, *args))
                except BaseException as exc:  # handed to the caller
                    future.set_exception(exc)

        self._submit_op(op)
        return await asyncio.wrap_future(future)

    # ----- the stepping thread ---------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            if not self._ops and not self.engine.has_work:
                self._wake.wait()
                self._wake.clear()
                self.last_progress = time.monotonic()  # idle time is not being stuck
                continue
            try:
                while self._ops:
                    self._ops.popleft()()
                outputs = self.engine.step() if self.engine.has_work else []
            except Exception as exc:  # a failed step fails its requests, not the server
                self.error = exc
                self._fail_streams(exc)
                self.engine.cancel_all()
                continue
            self.last_progress = time.monotonic()
            self._deliver(outputs)

    def stuck_for(self) -> float:
        """Seconds the loop has had work without finishing a step (0 when idle)."""
        if not self.engine.has_work and not self._ops:
            return 0.0
        return time.monotonic() - self.last_progress


def _put_all(pairs: list[tuple[asyncio.Queue, Any]]) -> None:
    for queue, item in pairs:
        queue.put_nowait(item)
