"""An asyncio driver for the engine: one stepping thread, per-request output queues.

Every mutation of the engine (submit, cancel, step) happens on the stepping thread, so the event
loop never blocks on a forward pass and the engine needs no locks. Ray-free: the model-server
deployment wraps it, tests drive it directly. A consumer slower than the engine gets the outputs
of the steps it missed merged into one (deltas concatenated), so a busy server sends fewer,
larger messages rather than falling behind.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor

from models.engine.engine import Engine, StepOutput
from models.modes import DecodeParams
from models.segments import PromptEmbeds


class AsyncEngine:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._queues: dict[str, asyncio.Queue] = {}
        self._ops: deque[Callable[[], None]] = deque()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self.last_progress = time.monotonic()
        self.error: BaseException | None = None

    def _ensure_loop(self) -> None:
        if self._task is None or self._task.done():
            self._wake = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def generate(
        self,
        request_id: str,
        prompt: list[int],
        params: DecodeParams,
        embeds: PromptEmbeds | None = None,
        tier: str = "standard",
    ) -> AsyncIterator[StepOutput]:
        """Yield the request's step outputs until it finishes; cancel it if the consumer goes away."""
        request = self.engine.prepare(request_id, prompt, params, embeds, tier)  # raises on bad input, before queueing
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = queue
        self._ops.append(lambda: self.engine.submit(request))
        self._ensure_loop()
        self._wake.set()
        finished = False
        try:
            while not finished:
                item = await queue.get()
                while not isinstance(item, BaseException) and not queue.empty():
                    later = queue.get_nowait()
                    item = later if isinstance(later, BaseException) else item.merge(later)
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            self._queues.pop(request_id, None)
            if not finished:
                self._ops.append(lambda: self.engine.cancel(request_id))
                self._wake.set()

    def _apply_ops_and_step(self) -> list[StepOutput]:
        while self._ops:
            self._ops.popleft()()
        return self.engine.step() if self.engine.has_work else []

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._ops and not self.engine.has_work:
                self._wake.clear()
                await self._wake.wait()
                self.last_progress = time.monotonic()  # idle time is not being stuck
            try:
                outputs = await loop.run_in_executor(self._executor, self._apply_ops_and_step)
            except Exception as exc:  # a failed step fails its requests, not the server
                self.error = exc
                for queue in self._queues.values():
                    queue.put_nowait(exc)
                self._reset_after_error()
                continue
            self.last_progress = time.monotonic()
            for out in outputs:
                queue = self._queues.get(out.request_id)
                if queue is not None:
                    queue.put_nowait(out)

    def _reset_after_error(self) -> None:
        for request_id in list(self.engine.running) + [r.request_id for r in self.engine.waiting]:
            self.engine.cancel(request_id)

    async def call(self, fn: Callable, *args):
        """Run ``fn`` on the stepping thread (e.g. a scoring pass that must not race a step)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def stuck_for(self) -> float:
        """Seconds the loop has had work without finishing a step (0 when idle)."""
        if not self.engine.has_work and not self._ops:
            return 0.0
        return time.monotonic() - self.last_progress
