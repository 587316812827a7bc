"""The response bodies of the HTTP API as pydantic models: what /openapi.json documents for each
route. The routes build plain dicts (streams need them chunk by chunk); the API tests validate real
responses against these models, so the documentation cannot drift from what is sent."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """Every 4xx (and 503) answer: OpenAI's error shape."""

    error: ErrorBody


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TriserveInfo(BaseModel):
    """What served the request (``explored``: a router choice made to refresh that option's figures)."""

    model: str
    mode: str
    block_length: int | None
    explored: bool
    tier: str
    nfe: int
    tpf: float


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: str | None


class CompletionResponse(BaseModel):
    """A completion; a stream sends chunks of the same shape (``choices`` with text deltas; chunks
    with no choices carry ``usage`` or ``triserve_trace``)."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    triserve: TriserveInfo | None = None
    triserve_trace: dict[str, Any] | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]


class ChatMessageOut(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    logprobs: ChatLogprobs | None
    finish_reason: str | None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    triserve: TriserveInfo


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None
    finish_reason: str | None


class ChatCompletionChunk(BaseModel):
    """One server-sent event of a streamed chat completion."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    triserve: TriserveInfo | None = None
    triserve_trace: dict[str, Any] | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    max_model_len: int
    triserve: dict[str, Any]


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


class HealthResponse(BaseModel):
    status: Literal["ok", "unavailable"]
    models: dict[str, Literal["ok", "unavailable"]] = Field(description="per model: a replica answers or not")


ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in (
        (400, "invalid request"),
        (401, "missing or wrong API key"),
        (404, "unknown model"),
        (413, "prompt or KV cache need beyond the model's limits"),
        (429, "model overloaded (Retry-After)"),
    )
}


def responses(model: type[BaseModel], chunk: type[BaseModel] | None = None) -> dict[int | str, dict[str, Any]]:
    """FastAPI ``responses`` of a route: ``model`` as JSON (and, for a streaming route, server-sent
    events of ``chunk``), and the OpenAI-shaped errors."""
    ok: dict[str, Any] = {"model": model, "description": "success"}
    if chunk is not None:
        ref = {"$ref": f"#/components/schemas/{chunk.__name__}"}
        ok["content"] = {"text/event-stream": {"schema": ref}}
        ok["description"] = (
            f"success; with stream: true, server-sent events 'data: <{chunk.__name__}>', then 'data: [DONE]'"
        )
    return {200: ok, **ERRORS}
