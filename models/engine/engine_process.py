"""The engine in a process of its own (like vLLM v1's engine core), streamed to an asyncio front.

Why: every torch operation releases Python's GIL, and a model replica's process also runs Ray
Serve's event loops and serialisation threads. An engine stepping on a thread of that process
waits for the GIL after each of its ~1,000 operations per step whenever one of those threads holds
it: measured in-process, two threads doing short bursts of Python work 30% of the time cut a
16-request engine's tokens/s by about two thirds while the process still used one core. In its own process the
engine holds its own GIL; the replica only moves messages.

Protocol (tuples pickled by value over a socket pair: ``Connection.send`` would share tensors
through file descriptors, which two unrelated processes cannot do): the front sends
``("add", id, prompt, params, embeds, tier)``, ``("cancel", id)`` and ``("call", n, fn, args)``;
the engine process answers ``("ready", info, stats)`` once loaded, then ``("outputs", [StepOutput],
stats or None)`` after every step (``stats_due`` says when the stats go along), ``("error", id,
exc)`` for a request it refused, ``("result", n, ok, value)`` for a call, ``("stats", stats)`` after
commands that changed no step, and ``("failed", exc)`` when loading or a step failed (the step's
requests fail, the process goes on). The process exits when the front's end of the socket closes
(the replica stopped or died).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import pickle
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from multiprocessing.connection import Connection
from typing import Any

from models.engine.async_engine import StreamFront
from models.engine.engine import EngineStats, StepOutput
from models.engine.host import EngineHost, EngineSettings, load_host
from models.modes import DecodeParams
from models.segments import PromptEmbeds

READY_TIMEOUT_S = 600.0
# Most time between two copies of the engine's stats sent to the front while it steps. Pickling them
# (the router's cost windows included) took about 8% of the engine process's time when they went with
# every step of a lone AR request over HTTP; the router and the metrics need them fresh to tens of
# milliseconds, and a change in the request counts or a finished request sends them at once.
STATS_INTERVAL_S = 0.05


class ProcessEngine(StreamFront):
    """Start an engine process for ``settings`` and wait until it has loaded and warmed up."""

    def __init__(
        self, settings: EngineSettings, stream_interval_s: float = 0.0, lone_stream_interval_s: float = 0.0
    ) -> None:
        super().__init__(stream_interval_s, lone_stream_interval_s)
        ours, theirs = socket.socketpair()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        self._process = subprocess.Popen(
            [sys.executable, "-m", "models.engine.engine_process", str(theirs.fileno())],
            pass_fds=[theirs.fileno()],
            env=env,
        )
        theirs.close()
        self._socket = ours  # kept to shut down: closing a descriptor another thread reads does not end the read
        self._conn = Connection(os.dup(ours.fileno()))
        self._send_lock = threading.Lock()
        self._calls: dict[int, Future] = {}
        self._call_ids = itertools.count()
        self._reader: threading.Thread | None = None
        self._send(settings)
        if not self._conn.poll(READY_TIMEOUT_S):
            self.close()
            raise RuntimeError(f"the engine process did not load {settings.path} in {READY_TIMEOUT_S:.0f} s")
        try:
            message = receive(self._conn)
        except EOFError:
            raise RuntimeError(f"the engine process exited while loading (code {self._process.wait()})") from None
        if message[0] == "failed":
            self.close()
            raise message[1]
        _, self.info, self._stats = message
        self._reader = threading.Thread(target=self._read, name="engine-reader", daemon=True)
        self._reader.start()

    @property
    def stats(self) -> EngineStats:
        return self._stats

    def _send(self, message: Any) -> None:
        try:
            with self._send_lock:
                send(self._conn, message)
        except OSError as exc:  # the engine process died (the reader thread is about to say so)
            raise RuntimeError(f"the engine process is gone ({exc})") from exc

    def _busy(self) -> bool:
        return bool(self._queues or self._calls)

    def _add(
        self, request_id: str, prompt: list[int], params: DecodeParams, embeds: PromptEmbeds | None, tier: str
    ) -> None:
        if self.error is not None:
            raise RuntimeError(f"the engine process is gone: {self.error}")
        if len(self._queues) == 1:  # was idle: time without messages so far is not being stuck
            self.last_progress = time.monotonic()
        self._send(("add", request_id, prompt, params, embeds, tier))

    def _cancel(self, request_id: str) -> None:
        if self.error is None:
            try:
                self._send(("cancel", request_id))
            except RuntimeError:  # gone: nothing left to cancel
                pass

    async def call(self, fn: Callable, *args) -> Any:
        if self.error is not None:
            raise RuntimeError(f"the engine process is gone: {self.error}")
        if not self._busy():
            self.last_progress = time.monotonic()
        number = next(self._call_ids)
        future: Future = Future()
        self._calls[number] = future
        self._send(("call", number, fn, args))
        return await asyncio.wrap_future(future)

    def _read(self) -> None:
        """The reader thread: messages from the engine process to the requests' queues and calls."""
        while True:
            try:
                message = receive(self._conn)
            except (EOFError, OSError):
                break
            self.last_progress = time.monotonic()
            kind = message[0]
            if kind == "outputs":
                if message[2] is not None:
                    self._stats = message[2]
                self._deliver(message[1])
            elif kind == "stats":
                self._stats = message[1]
            elif kind == "error":
                self._deliver([message[2]], [message[1]])
            elif kind == "result":
                future = self._calls.pop(message[1])
                future.set_result(message[3]) if message[2] else future.set_exception(message[3])
            elif kind == "failed":
                self._fail_streams(message[1])
        self._conn.close()
        self.error = RuntimeError(f"engine process exited (code {self._process.wait()})")
        self._fail_streams(self.error)
        for future in self._calls.values():
            future.set_exception(self.error)
        self._calls.clear()

    def stuck_for(self) -> float:
        """Seconds with requests or calls pending and no message from the engine process (0 when idle)."""
        return time.monotonic() - self.last_progress if self._busy() else 0.0

    def failure(self) -> str | None:
        return None if self.error is None else str(self.error)

    def close(self) -> None:
        """Stop the engine process (it also stops on its own when this process goes away)."""
        try:
            self._socket.shutdown(socket.SHUT_RDWR)  # the engine process and the reader thread see the end
        except OSError:  # already shut down
            pass
        self._socket.close()
        if self._reader is None:  # else the reader closes its descriptor when its read ends
            self._conn.close()
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()


def send(conn: Connection, message: Any) -> None:
    conn.send_bytes(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))


def receive(conn: Connection) -> Any:
    return pickle.loads(conn.recv_bytes())


# ----- the engine process -----------------------------------------------------------------------------
def serve(conn: Connection) -> None:
    """Load the host the front asks for, then step it and answer commands until the front goes away."""
    settings: EngineSettings = receive(conn)
    try:
        host = load_host(settings)
    except BaseException as exc:
        send(conn, ("failed", exc))
        return
    send(conn, ("ready", host.info, host.engine.stats))
    try:
        _step_and_answer(conn, host)
    except (EOFError, OSError):  # the front's end closed: the replica stopped or died
        return


def stats_due(outputs: list[StepOutput], counts: tuple[int, int], sent: tuple[int, int], since_s: float) -> bool:
    """Whether a step's stats go to the front: a request finished, the (running, waiting) counts
    changed since the stats last went, or ``STATS_INTERVAL_S`` passed."""
    return counts != sent or since_s >= STATS_INTERVAL_S or any(out.finished for out in outputs)


def _step_and_answer(conn: Connection, host: EngineHost) -> None:
    engine = host.engine
    sent_counts, sent_at = (-1, -1), 0.0
    while True:
        if not engine.has_work:
            conn.poll(None)  # idle: wait for a command (or the front's end closing)
        handled = False
        while conn.poll():
            _handle(conn, host, receive(conn))
            handled = True
        if not engine.has_work:
            if handled:
                send(conn, ("stats", engine.stats))
            continue
        try:
            outputs = engine.step()
        except Exception as exc:  # a failed step fails its requests, not the process
            engine.cancel_all()
            send(conn, ("failed", exc))
            continue
        stats, now = engine.stats, time.monotonic()
        counts = (stats.running, stats.waiting)
        if stats_due(outputs, counts, sent_counts, now - sent_at):
            sent_counts, sent_at = counts, now
        else:
            stats = None
        send(conn, ("outputs", outputs, stats))


def _handle(conn: Connection, host: EngineHost, message: tuple) -> None:
    kind = message[0]
    if kind == "add":
        _, request_id, prompt, params, embeds, tier = message
        try:
            host.engine.submit(host.engine.prepare(request_id, prompt, params, embeds, tier))
        except ValueError as exc:  # refused (bad input, too long, a duplicate id): that request fails
            send(conn, ("error", request_id, exc))
    elif kind == "cancel":
        host.engine.cancel(message[1])
    elif kind == "call":
        _, number, fn, args = message
        try:
            send(conn, ("result", number, True, fn(host, *args)))
        except Exception as exc:
            send(conn, ("result", number, False, exc))


if __name__ == "__main__":
    serve(Connection(int(sys.argv[1])))
