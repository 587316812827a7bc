"""The OpenAI-compatible service, Ray-free: request handling over abstract model backends.

``OpenAIService`` turns validated requests into engine requests (prompts from
``deployments.prompts``, routing through ``deployments.router``, limits) and runs them (text
deltas with stop strings, infilling, trace events; shaping in ``deployments.responses``). The
routes are in ``deployments.http``; the Serve ingress (deployments/ingress.py) plugs in backends
that call the model servers through deployment handles.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
import weakref
from collections import Counter, defaultdict, deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from deployments.affinity import AFFINITY_FIELD, affinity_key
from deployments.config import AppConfig
from deployments.prompts import chat_prompt, encode_prompt
from deployments.protocol import (
    APIError,
    CommonRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    new_id,
    overloaded,
    triserve_info,
    unavailable,
)
from deployments.responses import StopStrings, trace_view
from deployments.router import ROUTABLE_MODES, Candidate, Decision, ReplicaStats, best, evaluate, explore
from deployments.served import ServedModel
from models.engine.costs import OptionStats, option_key, split_option
from models.engine.detokenizer import IncrementalDetokenizer
from models.infill import Middle, best_rated, middle_lengths, middle_of, scored_text
from models.modes import DecodeParams, kv_tokens_needed
from models.modes.infill import infill_context

DEFAULT_MAX_TOKENS = {"completion": 16, "chat": 512}  # OpenAI's completions default; chat: context-bound
STATS_TTL_S = 0.5
STATS_TIMEOUT_S = 5.0
HEALTH_TIMEOUT_S = 2.0

logger = logging.getLogger("ray.serve")


@dataclass
class Prepared:
    model: ServedModel
    prompt: list[int]
    params: DecodeParams
    tier: str
    stops: list[str]
    decision: Decision | None
    images: list[np.ndarray] = field(default_factory=list)  # preprocessed, in prompt order
    deadline: float = math.inf  # time.monotonic() after which the request is cancelled (408)


class OpenAIService:
    def __init__(
        self,
        config: AppConfig,
        models: dict[str, ServedModel],
        on_decision: Callable | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self.models = models
        self.on_decision = on_decision
        self.rng = rng or random.Random()  # exploration draws
        self._stats: dict[str, tuple[float, dict[str, Any]]] = {}
        self._refreshing: dict[str, asyncio.Future] = {}  # per model: the stats call under way, if any
        # requests this ingress has prepared and not yet finished, per model: replicas report theirs
        # every half second, too late for a burst whose requests arrive together
        self.in_flight: Counter[str] = Counter()
        # (time, in flight) after each change, for the last ``load_window_s``: see ``recent_load``
        self._load_history: dict[str, deque[tuple[float, int]]] = defaultdict(deque)
        self.draining = False  # shutting down: new requests are refused, those in flight finish

    # ----- auth and listing ------------------------------------------------------------------
    def check_auth(self, authorization: str | None) -> None:
        if self.draining:
            raise unavailable("the server is shutting down", code="shutting_down")
        key = self.config.api_key
        if key is None:
            return
        if not authorization or not authorization.startswith("Bearer "):
            raise APIError(
                401,
                "missing API key: send 'Authorization: Bearer <key>'",
                type="authentication_error",
                code="invalid_api_key",
            )
        if authorization[len("Bearer ") :].strip() != key:
            raise APIError(401, "incorrect API key provided", type="authentication_error", code="invalid_api_key")

    def list_models(self) -> dict[str, Any]:
        data = [
            {
                "id": name,
                "object": "model",
                "created": 0,
                "owned_by": "triserve",
                "max_model_len": m.config.max_position_embeddings,
                "triserve": {"vision": m.vision is not None, "block_size": m.config.block_size},
            }
            for name, m in self.models.items()
        ]
        return {"object": "list", "data": data}

    async def health(self) -> dict[str, str]:
        """Per model, "ok" when one of its replicas answers for its statistics within 2 s."""

        async def probe(model: ServedModel) -> str:
            try:
                await asyncio.wait_for(model.backend.stats(), HEALTH_TIMEOUT_S)
                return "ok"
            except Exception:  # any failure to answer: a dead replica, a deployment still starting
                return "unavailable"

        states = await asyncio.gather(*(probe(m) for m in self.models.values()))
        return dict(zip(self.models, states))

    def tokenize(self, req: TokenizeRequest) -> dict[str, Any]:
        model = self._model(req.model)
        if req.prompt is not None:
            ids = model.tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens)
        else:
            ids, _ = chat_prompt(model, req, self.config.images, add_generation_prompt=req.add_generation_prompt)
        return {"count": len(ids), "max_model_len": model.config.max_position_embeddings, "tokens": ids}

    def detokenize(self, req: DetokenizeRequest) -> dict[str, Any]:
        model = self._model(req.model)
        vocab = model.config.vocab_size
        if any(t < 0 or t >= vocab for t in req.tokens):
            raise APIError(400, f"token ids must be integers in [0, {vocab})", param="tokens")
        return {"prompt": model.tokenizer.decode(req.tokens)}

    def _model(self, name: str) -> ServedModel:
        if name not in self.models:
            raise APIError(404, f"the model '{name}' does not exist", param="model", code="model_not_found")
        return self.models[name]

    # ----- request preparation ------------------------------------------------------------------
    async def _stats_of(self, name: str) -> dict[str, Any]:
        """The model's replica statistics, at most ``STATS_TTL_S`` old, else refreshed by one call that
        every request arriving meanwhile waits for. A stats call crosses two actors (about 14 ms on a
        2-core CPU under load), and each such request used to make its own: a burst of 16 made 16.
        (Answering from stale figures while the call runs was tried: the call then overlapped the
        request's own dispatch to the replica, and with ``max_queued_requests`` 1 the two queued at
        once got a 429.)"""
        cached = self._stats.get(name)
        if cached and time.monotonic() - cached[0] < STATS_TTL_S:
            return cached[1]
        refresh = self._refreshing.get(name)
        if refresh is None:
            refresh = asyncio.ensure_future(self._refresh_stats(name))
            self._refreshing[name] = refresh
            refresh.add_done_callback(lambda done: self._refreshed(name, done))
        return await asyncio.shield(refresh)  # a caller that gives up does not cancel the others' call

    async def _refresh_stats(self, name: str) -> dict[str, Any]:
        try:  # while a model has no live replica (one being replaced) the call would wait for one
            stats = await asyncio.wait_for(self.models[name].backend.stats(), STATS_TIMEOUT_S)
        except TimeoutError:  # route on what was known (a slow replica is no reason to refuse); the
            cached = self._stats.get(name)  # request's own deadline bounds its wait for a replica
            stats = cached[1] if cached else {}
        self._stats[name] = (time.monotonic(), stats)
        return stats

    def _refreshed(self, name: str, done: asyncio.Future) -> None:
        if self._refreshing.get(name) is done:
            del self._refreshing[name]
        if not done.cancelled() and done.exception() is not None:  # the waiting requests got it too
            logger.warning("stats of %s: %s", name, done.exception())

    def _candidate(self, model: ServedModel, stats: dict[str, Any], mode: str, block: int | None) -> Candidate:
        """The model as the router sees it: per-replica load, and the options this request may take
        (``mode`` "auto": every routable mode; no ``block``: the block lengths the model has figures
        for, or else the checkpoint's own)."""
        options = {key: OptionStats(**values) for key, values in (stats.get("options") or {}).items()}
        fixed = stats.get("fixed_step_s")
        per_token = stats.get("per_token_s")
        if fixed is None:  # no live fit yet: AR's calibrated step (one query token), or a guess from the size
            ar = options.get("ar") or OptionStats()
            if ar.step_s is not None:
                fixed, per_token = ar.step_s, ar.per_request_s
            else:
                fixed, per_token = 0.01 * model.size / 1e9 + 0.005, 0.0
        replicas = max(stats.get("replicas", 1), 1)
        waiting = stats.get("waiting", 0)
        running = max(stats.get("running", 0), self.recent_load(model.spec.name) - waiting)
        replica = ReplicaStats(
            fixed_step_s=fixed,
            per_token_s=per_token or 0.0,
            waiting=waiting / replicas,
            running=running / replicas,
            options=options,
            prefill_chunk=model.spec.prefill_chunk,
            speculation_max_batch=model.spec.speculation_max_batch,
        )
        modes = ROUTABLE_MODES if mode == "auto" else (mode,)
        calibrated = sorted({b for k in options if (b := split_option(k)[1])})
        blocks = (block,) if block else calibrated or (model.config.block_size,)
        keys = tuple(dict.fromkeys(option_key(m, b) for m in modes for b in blocks))
        return Candidate(model.spec.name, model.size, replica, keys)

    async def _route(
        self, req: CommonRequest, prompt_len: int, images: bool = False
    ) -> tuple[ServedModel, str, Decision | None]:
        mode = req.decoding.mode if req.decoding else "auto"
        if _suffix(req):  # only diffusion fills in a middle
            if mode not in ("auto", "diffusion"):
                message = f"suffix (infilling) needs decoding mode diffusion or auto, not {mode}"
                raise APIError(400, message, param="suffix")
            mode = "diffusion"
        if req.model != "auto" and mode != "auto":
            return self._model(req.model), mode, None
        if req.model != "auto":
            self._model(req.model)  # 404 for an unknown one
        names = list(self.models) if req.model == "auto" else [req.model]
        names = [n for n in names if self.models[n].vision or not images]  # images go to VLMs only
        block = req.decoding.block_length if req.decoding else None
        stats = {name: await self._stats_of(name) for name in names}
        candidates = [self._candidate(self.models[name], stats[name], mode, block) for name in names]
        target = self.config.tiers[req.tier]
        options = evaluate(target, candidates, prompt_len)
        decision = best(options)
        if mode == "auto":
            samples = {k: v.get("samples", 0) for k, v in (stats[decision.model].get("options") or {}).items()}
            decision = explore(decision, options, samples, self.config.explore, self.rng)
        if self.on_decision:
            self.on_decision(req.tier, decision)
        return self.models[decision.model], decision.mode, decision

    async def prepare(self, req: CommonRequest, kind: str, one: str | list[int] | None = None) -> Prepared:
        """The engine request for ``req`` (``one``: which of a completions request's prompts)."""
        # with model 'auto' the router sizes the prompt with the first model's tokenizer; the prompt
        # is then encoded again for the chosen model when its tokenizer differs
        first = self.models.get(req.model) or (next(iter(self.models.values())) if req.model == "auto" else None)
        if first is None:
            raise APIError(404, f"the model '{req.model}' does not exist", param="model", code="model_not_found")

        has_images = kind == "chat" and any(
            isinstance(m.content, list) and any(p.get("type") == "image_url" for p in m.content) for m in req.messages
        )
        if has_images and req.model == "auto":
            first = next((m for m in self.models.values() if m.vision), None)
            if first is None:
                raise APIError(400, "no served model accepts images", param="messages")

        async def encode(target: ServedModel) -> tuple[list[int], list[np.ndarray]]:
            if kind != "chat":
                return encode_prompt(target, req.prompt if one is None else one), []
            if has_images:  # decoding and resizing images (or fetching them) off the event loop
                return await asyncio.to_thread(chat_prompt, target, req, self.config.images)
            return chat_prompt(target, req, self.config.images)

        prompt, images = await encode(first)
        model, mode, decision = await self._route(req, len(prompt), has_images)
        if model.tokenizer is not first.tokenizer:
            prompt, images = await encode(model)
        context = model.config.max_position_embeddings
        if len(prompt) >= context:
            raise APIError(
                413,
                f"prompt is {len(prompt)} tokens; the model's context is {context}",
                param="prompt" if kind == "completion" else "messages",
                code="context_length_exceeded",
            )
        if kind == "chat":
            try:
                limit = req.output_limit
            except ValueError as exc:
                raise APIError(400, str(exc), param="max_tokens") from None
        else:
            limit = req.max_tokens
        if limit is None:
            limit = min(DEFAULT_MAX_TOKENS[kind], context - len(prompt))
        if len(prompt) + limit > context:
            raise APIError(
                400,
                f"prompt ({len(prompt)} tokens) plus max_tokens ({limit}) exceeds the model's "
                f"context of {context} tokens",
                param="max_tokens",
                code="context_length_exceeded",
            )
        controls = req.controls
        try:
            controls.check_tokens(model.config.vocab_size)
        except ValueError as exc:
            raise APIError(400, str(exc), param="logit_bias" if req.logit_bias else "stop_token_ids") from None
        if controls.min_tokens > limit:
            raise APIError(400, "min_tokens must not exceed max_tokens", param="min_tokens")
        logprobs = req.logprobs_count
        if logprobs is None and req.choices > req.n:
            logprobs = 0  # best_of ranks the sequences by their log-probabilities
        dec = req.decoding
        if dec and dec.trace and not req.stream:
            raise APIError(
                400, "decoding.trace needs stream: true (its events are stream chunks)", param="decoding.trace"
            )
        suffix = tuple(model.tokenizer.encode(_suffix(req), add_special_tokens=False)) if _suffix(req) else ()
        params = DecodeParams(
            mode=mode,
            max_new_tokens=max(limit, 1),  # 0 (echo-only scoring) never reaches the engine
            block_length=(dec.block_length if dec else None) or (decision.block_length if decision else None),
            threshold=dec.threshold if dec and dec.threshold is not None else 0.9,
            max_steps=dec.max_steps if dec else None,
            branches=dec.branches if dec else None,
            temperature=1.0 if req.temperature is None else req.temperature,
            seed=req.seed,
            suffix=suffix,
            revise=dec.revise.threshold if dec and dec.revise else None,
            revise_passes=dec.revise.max_passes if dec and dec.revise else 8,
            trace=bool(dec and dec.trace),
            controls=controls,
            logprobs=logprobs,
            explored=bool(decision and decision.explored),
        )
        try:
            params.validate()
        except ValueError as exc:
            raise APIError(400, str(exc), param="decoding") from None
        if suffix:
            block = params.block_length or model.config.block_size
            needed = infill_context(len(prompt), params.max_new_tokens, block, len(suffix))
            if needed > context:
                raise APIError(
                    400,
                    f"prompt ({len(prompt)} tokens), max_tokens ({limit}) and the {needed - len(prompt) - limit} "
                    f"suffix tokens the middle sees exceed the model's context of {context} tokens",
                    param="suffix",
                    code="context_length_exceeded",
                )
        worst = kv_tokens_needed(len(prompt), params, model.config.block_size)
        if -(-worst // model.spec.page_size) > model.spec.num_pages:
            raise APIError(
                413,
                f"request needs {worst} tokens of KV cache; the server holds "
                f"{model.spec.num_pages * model.spec.page_size}",
                code="context_length_exceeded",
            )
        stats = await self._stats_of(model.spec.name)
        if stats.get("waiting", 0) >= model.spec.max_waiting:
            raise overloaded(model.spec.name)
        timeout = min(req.timeout or math.inf, self.config.request_timeout_s)
        prep = Prepared(model, prompt, params, req.tier, req.stop_list, decision, images, time.monotonic() + timeout)
        self.in_flight[model.spec.name] += 1  # until the request is done with (its Prepared is freed)
        self._note_load(model.spec.name)
        weakref.finalize(prep, self._release, model.spec.name)
        return prep

    def _release(self, name: str) -> None:
        self.in_flight[name] -= 1
        self._note_load(name)

    def _note_load(self, name: str) -> None:
        history = self._load_history[name]
        now = time.monotonic()
        history.append((now, self.in_flight[name]))
        while history and history[0][0] < now - self.config.load_window_s:
            history.popleft()

    def recent_load(self, name: str) -> int:
        """Requests this ingress plans a new one of ``name`` to run beside: the most in flight at any
        time in the last ``load_window_s`` (or now). Requests that arrive together are routed one by
        one, each seeing only those before it, yet they run together for their whole lives: planned
        for the instantaneous count, the first half of a burst of 16 took self-speculation and then
        decoded in a crowded batch at 0.6x AR's throughput. Load is assumed to stay at its recent peak."""
        self._note_load(name)  # drops what fell out of the window
        return max(n for _, n in self._load_history[name])

    @staticmethod
    def fan_out(prep: Prepared, count: int) -> list[Prepared]:
        """``count`` independent sequences of one prepared request (``n``, ``best_of``): sequence i
        draws with seed ``seed + i`` when the request has a seed (so each equals a single request with
        that seed). They share the prompt's KV pages: the engine computes the prompt once
        (``Scheduler._prefill_underway``)."""
        seed = prep.params.seed
        return [prep] + [
            replace(prep, params=replace(prep.params, seed=None if seed is None else seed + i)) for i in range(1, count)
        ]

    # ----- running --------------------------------------------------------------------------------
    async def run(self, prep: Prepared) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        """Yield (text delta, step output) until the request ends (EOS, length or a stop string).

        The step output carries ``all_tokens``: the ids generated so far, with logprobs the ``scores``
        of the tokens since the last yield, and with ``decoding.trace`` its forwards' ``trace`` events
        (token ids shown as text). Text is decoded and searched for stop
        strings incrementally (work per output grows with its new tokens only). A request with a
        suffix runs as infilling (``_run_infill``).
        """
        if prep.params.suffix:
            async for item in self._run_infill(prep):
                yield item
            return
        detokenizer = IncrementalDetokenizer(prep.model.tokenizer)
        tracer = IncrementalDetokenizer(prep.model.tokenizer) if prep.params.trace else None
        stops = StopStrings(prep.stops)
        stream = prep.model.backend.generate(self._engine_request(prep, prep.params))
        scores: list = []  # of tokens whose text has not been yielded yet
        try:
            async for out in until(prep.deadline, stream):
                text = detokenizer.push(out["new_tokens"])
                if out["finished"]:
                    text += detokenizer.flush()
                scores += out.get("new_logprobs") or []
                out = {**out, "all_tokens": detokenizer.tokens, "scores": scores}
                if tracer is not None:
                    out["trace"] = trace_view(prep.model.tokenizer, out.get("trace") or [], tracer, out["finished"])
                delta, stopped = stops.feed(text, final=out["finished"])
                if stopped:
                    yield delta, {**out, "finished": True, "finish_reason": "stop", "stopped_by_string": True}
                    return
                if delta or out["finished"] or out.get("trace"):
                    yield delta, out
                    scores = []
                if out["finished"]:
                    return
        finally:
            await _close(stream)

    def _engine_request(self, prep: Prepared, params: DecodeParams) -> dict[str, Any]:
        request = {"request_id": new_id("req"), "prompt": prep.prompt, "params": params.__dict__, "tier": prep.tier}
        key = affinity_key(prep.prompt, prep.model.spec.page_size)
        if key is not None:
            request[AFFINITY_FIELD] = key
        if prep.images:
            request["images"] = prep.images
        return request

    async def _run_infill(self, prep: Prepared) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        """Infilling (``models.infill``): one engine request per middle length tried, all at once;
        their trace events as they come (marked with the ``candidate`` length); then the best rated middle
        (``models.infill.Middle.rate``), as one delta (and a ``chosen`` trace event)."""
        model, params = prep.model, prep.params
        tok = model.tokenizer
        lengths = middle_lengths(params.max_new_tokens)
        streams = [
            model.backend.generate(self._engine_request(prep, replace(params, max_new_tokens=m))) for m in lengths
        ]
        tracers = [IncrementalDetokenizer(tok) for _ in lengths]
        tokens: list[list[int]] = [[] for _ in lengths]
        scores: list[list] = [[] for _ in lengths]
        nfe = [0] * len(lengths)
        async for i, out in until(prep.deadline, merge_streams(streams)):
            tokens[i] += out["new_tokens"]
            scores[i] += out.get("new_logprobs") or []
            nfe[i] = out["nfe"]
            if params.trace and out.get("trace"):
                view = trace_view(tok, out["trace"], tracers[i], out["finished"])
                yield "", {"finished": False, "trace": [{**e, "candidate": lengths[i]} for e in view]}
        eos = model.config.eos_token_id
        candidates = [Middle(m, middle_of(t, eos), n) for m, t, n in zip(lengths, tokens, nfe)]
        block = params.block_length or model.config.block_size

        async def rate(candidate: Middle) -> None:
            ids = scored_text(prep.prompt, candidate.tokens, list(params.suffix), block)
            candidate.rate(len(prep.prompt), [lp for lp, _ in await model.backend.score(ids, 0)])

        await asyncio.gather(*(rate(c) for c in candidates))
        chosen = best_rated(candidates)
        text, _ = StopStrings(prep.stops).feed(tok.decode(chosen.tokens, skip_special_tokens=True), final=True)
        out = {
            "new_tokens": chosen.tokens,
            "all_tokens": chosen.tokens,
            "scores": scores[candidates.index(chosen)][: len(chosen.tokens)],
            "finished": True,
            "finish_reason": "stop",
            "nfe": sum(c.nfe for c in candidates),
            "tokens": len(chosen.tokens),
        }
        if params.trace:
            out["trace"] = [{"kind": "chosen", "candidate": chosen.length, "text": text}]
        yield text, out

    def info(self, prep: Prepared, out: dict[str, Any] | None) -> dict[str, Any]:
        nfe = out["nfe"] if out else 0
        tokens = out["tokens"] if out else 0
        block = None if prep.params.mode == "ar" else prep.params.block_length or prep.model.config.block_size
        explored = bool(prep.decision and prep.decision.explored)
        return triserve_info(prep.model.spec.name, prep.params.mode, block, explored, prep.tier, nfe, tokens)


def _suffix(req: CommonRequest) -> str | None:
    """The infilling suffix: a completions field (a chat request's unknown fields are not read)."""
    return req.suffix if isinstance(req, CompletionRequest) else None


async def merge_streams(streams: list[AsyncIterator[Any]]) -> AsyncIterator[tuple[int, Any]]:
    """(index, item) of several async streams as their items come: one stream is read directly,
    several each in a task; the first failure is raised, and leaving early cancels and closes them."""
    if len(streams) == 1:
        async for item in streams[0]:
            yield 0, item
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[Any]) -> None:
        try:
            async for item in stream:
                queue.put_nowait((index, item, None, False))
        except Exception as exc:  # handed to the consumer, which raises it
            queue.put_nowait((index, None, exc, True))
        else:
            queue.put_nowait((index, None, None, True))
        finally:
            await _close(stream)

    tasks = [asyncio.create_task(pump(i, stream)) for i, stream in enumerate(streams)]
    try:
        running = len(tasks)
        while running:
            index, item, error, ended = await queue.get()
            if error is not None:
                raise error
            if ended:
                running -= 1
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()


async def until(deadline: float, stream: AsyncIterator[Any]) -> AsyncIterator[Any]:
    """The stream's items until ``deadline`` (time.monotonic()); past it, a 408 (the caller closes the
    stream, which cancels the request and frees its pages)."""
    items = aiter(stream)
    while True:
        left = max(deadline - time.monotonic(), 0.0) if math.isfinite(deadline) else None
        try:
            yield await asyncio.wait_for(anext(items), left)
        except StopAsyncIteration:
            return
        except TimeoutError:
            raise APIError(408, "the request ran past its deadline", type="timeout_error", code="timeout") from None


async def gather_or_cancel(*awaitables: Awaitable[Any]) -> list[Any]:
    """``asyncio.gather``, except that when one fails the others are cancelled, not left running."""
    tasks = [asyncio.ensure_future(a) for a in awaitables]
    try:
        return await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()


async def _close(stream) -> None:
    closer: Callable[[], Awaitable[None]] | None = getattr(stream, "aclose", None)
    if closer is not None:
        await closer()
