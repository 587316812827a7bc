"""FastAPI routes of the OpenAI-compatible API over an ``OpenAIService`` found by ``resolve``."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from pydantic import ValidationError

from deployments.openai_api import OpenAIService, Prepared, gather_or_cancel, merge_streams
from deployments.protocol import (
    APIError,
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    new_id,
    now,
)
from deployments.response_models import (
    ChatCompletionChunk,
    ChatCompletionResponse,
    CompletionResponse,
    DetokenizeResponse,
    HealthResponse,
    ModelList,
    TokenizeResponse,
    responses,
)
from deployments.responses import chat_logprobs, completion_logprobs, prompt_scores, sse

logger = logging.getLogger("ray.serve")
PLAYGROUND = Path(__file__).resolve().parent / "playground"  # static files, package data
PLAYGROUND_ASSETS = {"app.js": "text/javascript", "style.css": "text/css"}


# request models (and what they refer to) go to the components themselves; response models reach
# them through the routes' ``responses``, except the chat stream's chunk, which only a $ref names
COMPONENT_MODELS = (CompletionRequest, ChatRequest, TokenizeRequest, DetokenizeRequest, ChatCompletionChunk)


def _body(model_cls) -> dict[str, Any]:
    """The OpenAPI request body of a route that parses its JSON itself (auth first, OpenAI-shaped
    errors, ``extra_body`` merged): its schema is the pydantic model's, under components."""
    schema = {"$ref": f"#/components/schemas/{model_cls.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def _component_schemas() -> dict[str, Any]:
    """Components for ``_body`` and the chat stream: each of COMPONENT_MODELS and the models it refers to."""
    schemas: dict[str, Any] = {}
    for model_cls in COMPONENT_MODELS:
        schema = model_cls.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(schema.pop("$defs", {}))
        schemas[model_cls.__name__] = schema
    return schemas


def _error_response(exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body, status_code=exc.status, headers=exc.headers)


def _validation_error(exc: ValidationError | RequestValidationError) -> APIError:
    first = exc.errors()[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    return APIError(400, f"{param or 'request'}: {first.get('msg', 'invalid value')}", param=param)


async def _read_body(request: Request, limit: int) -> bytes:
    """The raw body, refused with a 413 as soon as it is known to exceed ``limit`` bytes."""
    too_large = APIError(413, f"request body exceeds the limit of {limit} bytes", code="body_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    return bytes(body)


def _not_finite(name: str):
    raise ValueError(f"{name} is not a number JSON allows")


async def _parse(service: OpenAIService, request: Request, model_cls):
    service.check_auth(request.headers.get("authorization"))
    raw = await _read_body(request, service.config.max_body_bytes)
    try:
        body = json.loads(raw, parse_constant=_not_finite)  # NaN and Infinity are not JSON
    except RecursionError:
        raise APIError(400, "request body nests too deeply") from None
    except ValueError as exc:  # malformed JSON, invalid UTF-8, NaN / Infinity
        raise APIError(400, f"request body must be JSON ({exc})") from None
    if not isinstance(body, dict):
        raise APIError(400, "request body must be a JSON object")
    extra = body.pop("extra_body", None)
    if isinstance(extra, dict):  # clients that post extra_body verbatim
        body.update(extra)
    try:
        return service, model_cls.model_validate(body)
    except ValidationError as exc:
        raise _validation_error(exc) from None


def _headers(service: OpenAIService, prep: Prepared, out: dict[str, Any] | None = None) -> dict[str, str]:
    info = service.info(prep, out)
    headers = {"x-triserve-model": info["model"], "x-triserve-mode": info["mode"], "x-triserve-tier": info["tier"]}
    if info["block_length"] is not None:
        headers["x-triserve-block-length"] = str(info["block_length"])
    if out is not None:
        headers.update({"x-triserve-nfe": str(info["nfe"]), "x-triserve-tpf": str(info["tpf"])})
    return headers


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def build_api(resolve: Callable[[], OpenAIService]) -> FastAPI:
    """The app; ``resolve`` returns the service of the process that serves it (a Serve replica)."""
    api = FastAPI(title="triserve", version="0.1.0")

    def openapi() -> dict[str, Any]:
        if api.openapi_schema is None:
            from fastapi.openapi.utils import get_openapi

            spec = get_openapi(title=api.title, version=api.version, routes=api.routes)
            spec.setdefault("components", {}).setdefault("schemas", {}).update(_component_schemas())
            api.openapi_schema = spec
        return api.openapi_schema

    api.openapi = openapi

    @api.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError):
        return _error_response(exc)

    @api.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError):
        return _error_response(_validation_error(exc))

    @api.get("/v1/models", responses=responses(ModelList))
    async def list_models(request: Request):
        service = resolve()
        service.check_auth(request.headers.get("authorization"))
        return service.list_models()

    @api.get("/", include_in_schema=False)
    async def playground():
        return FileResponse(PLAYGROUND / "index.html", media_type="text/html")

    @api.get("/playground/{name}", include_in_schema=False)
    async def playground_asset(name: str):
        if name not in PLAYGROUND_ASSETS:
            raise APIError(404, f"no playground file {name!r}", type="not_found_error")
        return FileResponse(PLAYGROUND / name, media_type=PLAYGROUND_ASSETS[name])

    @api.get("/health", responses={200: {"model": HealthResponse}, 503: {"model": HealthResponse}})
    async def health():
        """200 while a replica of some model answers (per model: "ok" or "unavailable"), else 503."""
        service = resolve()
        models = await service.health()
        healthy = any(state == "ok" for state in models.values()) and not service.draining
        return JSONResponse({"status": "ok" if healthy else "unavailable", "models": models}, 200 if healthy else 503)

    @api.post("/tokenize", openapi_extra=_body(TokenizeRequest), responses=responses(TokenizeResponse))
    async def tokenize(request: Request):
        service, req = await _parse(resolve(), request, TokenizeRequest)
        return service.tokenize(req)

    @api.post("/detokenize", openapi_extra=_body(DetokenizeRequest), responses=responses(DetokenizeResponse))
    async def detokenize(request: Request):
        service, req = await _parse(resolve(), request, DetokenizeRequest)
        return service.detokenize(req)

    @api.post(
        "/v1/completions",
        openapi_extra=_body(CompletionRequest),
        responses=responses(CompletionResponse, chunk=CompletionResponse),
    )
    async def completions(request: Request):
        service, req = await _parse(resolve(), request, CompletionRequest)
        if req.max_tokens == 0 and not req.echo:
            raise APIError(400, "max_tokens must be at least 1 unless echo is set", param="max_tokens")
        bases = [await service.prepare(req, "completion", prompt) for prompt in req.prompts]
        preps = [prep for base in bases for prep in service.fan_out(base, req.choices)]  # prompt by prompt
        prompt_tokens = sum(len(base.prompt) for base in bases)
        rid, created, top = new_id("cmpl"), now(), req.logprobs

        async def echoed(prep: Prepared) -> tuple[str, list[int], list]:
            """The prompt's text, and its ids and scores when logprobs are asked for."""
            text = prep.model.tokenizer.decode(prep.prompt, skip_special_tokens=True) if req.echo else ""
            if not req.echo or top is None:
                return text, [], []
            return text, prep.prompt, await prompt_scores(prep.model, prep.prompt, top)

        if req.stream:
            opening = []
            for index, prep in enumerate(preps):
                if req.echo:
                    text, ids, scores = await echoed(prep)
                    logprobs = completion_logprobs(prep.model.tokenizer, ids, scores, top, 0) if ids else None
                    opening.append({"index": index, "text": text, "logprobs": logprobs, "finish_reason": None})
            return _stream(service, preps, req, rid, created, "text_completion", opening, prompt_tokens)

        async def complete(prep: Prepared) -> tuple[dict[str, Any], Collected]:
            done = await _collect(service, prep) if req.max_tokens != 0 else Collected()
            echo, ids, scores = await echoed(prep)
            logprobs = None
            if top is not None:
                logprobs = completion_logprobs(prep.model.tokenizer, ids + done.ids, scores + done.scores, top, 0)
            choice = {"text": echo + done.text, "logprobs": logprobs, "finish_reason": done.finish_reason}
            return choice, done

        done = await gather_or_cancel(*(complete(prep) for prep in preps))
        kept = done
        if req.choices > req.n:  # best_of: per prompt, the n sequences of highest log-probability
            per = req.choices
            kept = [
                pick
                for i in range(len(bases))
                for pick in sorted(done[i * per : (i + 1) * per], key=lambda d: -d[1].logprob)[: req.n]
            ]
        choices = [{"index": index, **choice} for index, (choice, _) in enumerate(kept)]
        last = done[0][1].last
        body = _chunk(rid, created, "text_completion", preps[0].model.spec.name, choices)
        body["usage"] = _usage(prompt_tokens, sum(len(d.ids) for _, d in done))
        body["triserve"] = service.info(preps[0], last)
        return JSONResponse(body, headers=_headers(service, preps[0], last))

    @api.post(
        "/v1/chat/completions",
        openapi_extra=_body(ChatRequest),
        responses=responses(ChatCompletionResponse, chunk=ChatCompletionChunk),
    )
    async def chat(request: Request):
        service, req = await _parse(resolve(), request, ChatRequest)
        first = await service.prepare(req, "chat")
        preps = service.fan_out(first, req.n)
        rid, created = new_id("chatcmpl"), now()
        if req.stream:
            opening = [
                {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                for i in range(len(preps))
            ]
            return _stream(service, preps, req, rid, created, "chat.completion.chunk", opening, len(first.prompt))

        done = await gather_or_cancel(*(_collect(service, prep) for prep in preps))
        tokenizer = first.model.tokenizer
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": d.text},
                "logprobs": chat_logprobs(tokenizer, d.ids, d.scores) if req.logprobs else None,
                "finish_reason": d.finish_reason,
            }
            for i, d in enumerate(done)
        ]
        body = {
            "id": rid,
            "object": "chat.completion",
            "created": created,
            "model": first.model.spec.name,
            "choices": choices,
            "usage": _usage(len(first.prompt), sum(len(d.ids) for d in done)),
            "triserve": service.info(first, done[0].last),
        }
        return JSONResponse(body, headers=_headers(service, first, done[0].last))

    return api


def _chunk(rid: str, created: int, kind: str, model: str, choices: list[dict], **extra: Any) -> dict[str, Any]:
    return {"id": rid, "object": kind, "created": created, "model": model, "choices": choices, **extra}


def _stream(
    service: OpenAIService,
    preps: list[Prepared],
    req,
    rid: str,
    created: int,
    kind: str,
    opening: list[dict[str, Any]],
    prompt_tokens: int,
) -> StreamingResponse:
    """The SSE stream of either endpoint (``kind``: the chunk object) for one or more sequences (choice
    ``index`` i for ``preps[i]``, interleaved as they decode): ``opening`` choices (the chat role,
    echoed prompts), then text as it is decoded (with logprobs when asked: those of the tokens the
    chunk's text came from), ``decoding.trace`` events as chunks with no choices and a
    ``triserve_trace`` field (clients that do not look for it see an empty chunk, as with usage), each
    choice's finishing chunk with its ``triserve`` info, the usage when asked, ``[DONE]``."""
    model = preps[0].model.spec.name
    tokenizer = preps[0].model.tokenizer
    chat = kind == "chat.completion.chunk"
    top = req.logprobs_count
    offsets = [0] * len(preps)  # completions' text_offset: after the echoed prompt
    for first in opening:
        offsets[first["index"]] = len(first.get("text", ""))

    def logprobs(index: int, ids: list[int], scores: list) -> dict[str, Any] | None:
        if top is None or not ids:
            return None
        if chat:
            return chat_logprobs(tokenizer, ids, scores)
        shaped = completion_logprobs(tokenizer, ids, scores, top, offsets[index])
        offsets[index] += sum(len(piece) for piece in shaped["tokens"])
        return shaped

    def choice(index: int, text: str, finish: str | None, scored: dict[str, Any] | None = None) -> dict[str, Any]:
        if chat:
            content = {"content": text} if text else {}
            return {"index": index, "delta": content, "logprobs": scored, "finish_reason": finish}
        return {"index": index, "text": text, "logprobs": scored, "finish_reason": finish}

    async def events():
        try:
            async for event in decoded():
                yield event
        except APIError as exc:  # a deadline, a failed replica: the stream ends with an error event
            yield sse(exc.body)
        except Exception as exc:  # not a client's fault: said as OpenAI says a server error
            logger.exception("stream %s failed", rid)
            yield sse(
                {"error": {"message": f"internal error: {exc}", "type": "server_error", "param": None, "code": None}}
            )
        yield sse("[DONE]")

    async def decoded():
        generated = [0] * len(preps)
        for first in opening:
            yield sse(_chunk(rid, created, kind, model, [first]))
        async for index, (delta, out) in merge_streams([service.run(prep) for prep in preps]):
            ids = list(out.get("all_tokens", ()))
            new, generated[index] = ids[generated[index] :], len(ids)
            for event in out.get("trace") or ():
                yield sse(_chunk(rid, created, kind, model, [], triserve_trace=event))
            finish = _finish(out["finish_reason"]) if out["finished"] else None
            scored = logprobs(index, new, out.get("scores") or [])
            if chat and (delta or scored) and finish:  # as OpenAI does, a chat stream finishes on a chunk of its own
                yield sse(_chunk(rid, created, kind, model, [choice(index, delta, None, scored)]))
                delta, scored = "", None
            if delta or finish or scored:
                extra = {"triserve": service.info(preps[index], out)} if finish else {}
                yield sse(_chunk(rid, created, kind, model, [choice(index, delta, finish, scored)], **extra))
        if req.stream_options and req.stream_options.include_usage:
            yield sse(_chunk(rid, created, kind, model, [], usage=_usage(prompt_tokens, sum(generated))))

    return StreamingResponse(events(), media_type="text/event-stream", headers=_headers(service, preps[0]))


def _finish(reason: str | None) -> str | None:
    return {"stop": "stop", "length": "length"}.get(reason, reason)


@dataclass
class Collected:
    """A request run to its end: text, generated ids, their scores (with logprobs), last step output."""

    text: str = ""
    ids: list[int] = field(default_factory=list)
    scores: list = field(default_factory=list)
    last: dict[str, Any] | None = None

    @property
    def finish_reason(self) -> str:
        return _finish(self.last["finish_reason"]) if self.last else "length"

    @property
    def logprob(self) -> float:
        """The sequence's log-probability under the distributions its tokens were chosen from."""
        return sum(score[0] for score in self.scores)


async def _collect(service: OpenAIService, prep: Prepared) -> Collected:
    done = Collected()
    parts: list[str] = []
    async for delta, out in service.run(prep):
        parts.append(delta)
        done.scores += out.get("scores") or []
        done.last = out
    done.text = "".join(parts)
    done.ids = list(done.last["all_tokens"]) if done.last else []
    return done
