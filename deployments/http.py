"""FastAPI routes of the OpenAI-compatible API over an ``OpenAIService`` found by ``resolve``."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from pydantic import ValidationError

from deployments.openai_api import OpenAIService, Prepared, merge_streams
from deployments.protocol import (
    APIError,
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    new_id,
    now,
)
from deployments.responses import completion_logprobs, sse

PLAYGROUND = Path(__file__).resolve().parent / "playground"  # static files, package data
PLAYGROUND_ASSETS = {"app.js": "text/javascript", "style.css": "text/css"}


REQUEST_MODELS = (CompletionRequest, ChatRequest, TokenizeRequest, DetokenizeRequest)


def _body(model_cls) -> dict[str, Any]:
    """The OpenAPI request body of a route that parses its JSON itself (auth first, OpenAI-shaped
    errors, ``extra_body`` merged): its schema is the pydantic model's, under components."""
    schema = {"$ref": f"#/components/schemas/{model_cls.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def _request_schemas() -> dict[str, Any]:
    """Components for ``_body``: each request model and the models it refers to."""
    schemas: dict[str, Any] = {}
    for model_cls in REQUEST_MODELS:
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


async def _parse(service: OpenAIService, request: Request, model_cls):
    service.check_auth(request.headers.get("authorization"))
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise APIError(400, "request body must be JSON") from None
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
            spec.setdefault("components", {}).setdefault("schemas", {}).update(_request_schemas())
            api.openapi_schema = spec
        return api.openapi_schema

    api.openapi = openapi

    @api.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError):
        return _error_response(exc)

    @api.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError):
        return _error_response(_validation_error(exc))

    @api.get("/v1/models")
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

    @api.get("/health")
    async def health():
        """200 while a replica of some model answers (per model: "ok" or "unavailable"), else 503."""
        models = await resolve().health()
        healthy = any(state == "ok" for state in models.values())
        return JSONResponse({"status": "ok" if healthy else "unavailable", "models": models}, 200 if healthy else 503)

    @api.post("/tokenize", openapi_extra=_body(TokenizeRequest))
    async def tokenize(request: Request):
        service, req = await _parse(resolve(), request, TokenizeRequest)
        return service.tokenize(req)

    @api.post("/detokenize", openapi_extra=_body(DetokenizeRequest))
    async def detokenize(request: Request):
        service, req = await _parse(resolve(), request, DetokenizeRequest)
        return service.detokenize(req)

    @api.post("/v1/completions", openapi_extra=_body(CompletionRequest))
    async def completions(request: Request):
        service, req = await _parse(resolve(), request, CompletionRequest)
        if req.max_tokens == 0 and not req.echo:
            raise APIError(400, "max_tokens must be at least 1 unless echo is set", param="max_tokens")
        preps = [await service.prepare(req, "completion", prompt) for prompt in req.prompts]
        rid, created = new_id("cmpl"), now()
        if req.stream:
            opening = []
            for index, prep in enumerate(preps):
                if req.echo:
                    echo = prep.model.tokenizer.decode(prep.prompt, skip_special_tokens=True)
                    opening.append({"index": index, "text": echo, "logprobs": None, "finish_reason": None})
            return _stream(service, preps, req, rid, created, "text_completion", opening)

        async def complete(index: int, prep: Prepared) -> tuple[dict[str, Any], dict[str, Any] | None, int]:
            text, last, ids = await _collect(service, prep) if req.max_tokens != 0 else ("", None, [])
            logprobs = None
            if req.logprobs is not None:
                first = 0 if req.echo else len(prep.prompt)
                logprobs = await completion_logprobs(prep.model, prep.prompt + ids, first, req.logprobs)
            if req.echo:
                text = prep.model.tokenizer.decode(prep.prompt, skip_special_tokens=True) + text
            finish = _finish(last["finish_reason"]) if last else "length"
            return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}, last, len(ids)

        done = await asyncio.gather(*(complete(i, prep) for i, prep in enumerate(preps)))
        body = _chunk(rid, created, "text_completion", preps[0].model.spec.name, [choice for choice, _, _ in done])
        body["usage"] = _usage(sum(len(p.prompt) for p in preps), sum(n for _, _, n in done))
        body["triserve"] = service.info(preps[0], done[0][1])
        return JSONResponse(body, headers=_headers(service, preps[0], done[0][1]))

    @api.post("/v1/chat/completions", openapi_extra=_body(ChatRequest))
    async def chat(request: Request):
        service, req = await _parse(resolve(), request, ChatRequest)
        prep = await service.prepare(req, "chat")
        rid, created = new_id("chatcmpl"), now()
        model_name = prep.model.spec.name

        if req.stream:
            opening = [
                {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
            ]
            return _stream(service, [prep], req, rid, created, "chat.completion.chunk", opening)

        text, last, ids = await _collect(service, prep)
        body = {
            "id": rid,
            "object": "chat.completion",
            "created": created,
            "model": model_name,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": None,
                    "finish_reason": _finish(last["finish_reason"]) if last else "length",
                }
            ],
            "usage": _usage(len(prep.prompt), len(ids)),
            "triserve": service.info(prep, last),
        }
        return JSONResponse(body, headers=_headers(service, prep, last))

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
) -> StreamingResponse:
    """The SSE stream of either endpoint (``kind``: the chunk object) for one or more prompts (choice
    ``index`` i for ``preps[i]``, interleaved as they decode): ``opening`` choices (the chat role,
    echoed prompts), then text as it is decoded, ``decoding.trace`` events as chunks with no choices
    and a ``triserve_trace`` field (clients that do not look for it see an empty chunk, as with usage),
    each choice's finishing chunk with its ``triserve`` info, the usage when asked, ``[DONE]``."""
    model = preps[0].model.spec.name
    chat = kind == "chat.completion.chunk"

    def choice(index: int, text: str, finish: str | None) -> dict[str, Any]:
        if chat:
            content = {"content": text} if text else {}
            return {"index": index, "delta": content, "logprobs": None, "finish_reason": finish}
        return {"index": index, "text": text, "logprobs": None, "finish_reason": finish}

    async def events():
        generated = [0] * len(preps)
        for first in opening:
            yield sse(_chunk(rid, created, kind, model, [first]))
        async for index, (delta, out) in merge_streams([service.run(prep) for prep in preps]):
            generated[index] = len(out.get("all_tokens", ()))
            for event in out.get("trace") or ():
                yield sse(_chunk(rid, created, kind, model, [], triserve_trace=event))
            finish = _finish(out["finish_reason"]) if out["finished"] else None
            if chat and delta and finish:  # as OpenAI does, a chat stream finishes on a chunk of its own
                yield sse(_chunk(rid, created, kind, model, [choice(index, delta, None)]))
                delta = ""
            if delta or finish:
                extra = {"triserve": service.info(preps[index], out)} if finish else {}
                yield sse(_chunk(rid, created, kind, model, [choice(index, delta, finish)], **extra))
        if req.stream_options and req.stream_options.include_usage:
            usage = _usage(sum(len(p.prompt) for p in preps), sum(generated))
            yield sse(_chunk(rid, created, kind, model, [], usage=usage))
        yield sse("[DONE]")

    return StreamingResponse(events(), media_type="text/event-stream", headers=_headers(service, preps[0]))


def _finish(reason: str | None) -> str | None:
    return {"stop": "stop", "length": "length"}.get(reason, reason)


async def _collect(service: OpenAIService, prep: Prepared) -> tuple[str, dict[str, Any] | None, list[int]]:
    """Run a request to the end: (text, last step output, generated ids)."""
    parts: list[str] = []
    last = None
    async for delta, out in service.run(prep):
        parts.append(delta)
        last = out
    return "".join(parts), last, list(last["all_tokens"]) if last else []
