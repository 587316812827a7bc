"""OpenAI request/response shapes, triserve's extensions, and OpenAI-style errors."""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from models.controls import SamplingControls

TIERS = ("interactive", "standard", "batch")
MAX_BATCH_PROMPTS = 256
SERVICE_TIER_ALIASES = {"auto": "standard", "default": "standard", "flex": "batch", "priority": "interactive"}


class APIError(Exception):
    """An error answered as ``{"error": {message, type, param, code}}`` with an HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body = {"error": {"message": message, "type": type, "param": param, "code": code}}
        self.headers = headers or {}


def unavailable(message: str, code: str = "replica_unavailable") -> APIError:
    """A retryable 503: no replica can serve the request now (failed, restarting, shutting down)."""
    return APIError(503, message, type="server_error", code=code, headers={"Retry-After": "1"})


def overloaded(model: str) -> APIError:
    """A retryable 429: the model's queue is full."""
    return APIError(
        429,
        f"model '{model}' is overloaded; retry shortly",
        type="rate_limit_error",
        code="overloaded",
        headers={"Retry-After": "1"},
    )


class Revise(BaseModel):
    """``decoding.revise``: re-mask decided diffusion tokens whose confidence falls below ``threshold``
    (``models.modes.diffusion``), in at most ``max_passes`` passes per block."""

    model_config = ConfigDict(extra="forbid")
    threshold: float = Field(gt=0.0, lt=1.0)
    max_passes: int = Field(default=8, ge=0, le=1024)


class Decoding(BaseModel):
    """The ``decoding`` extension: a mode (or auto) and its knobs."""

    model_config = ConfigDict(extra="forbid")
    mode: Literal["auto", "ar", "diffusion", "linear_spec", "quadratic_spec"] = "auto"
    block_length: int | None = Field(default=None, ge=2, le=128)
    threshold: float | None = Field(default=None, ge=0.0, le=1.0)
    max_steps: int | None = Field(default=None, ge=1)
    branches: int | None = Field(default=None, ge=1, le=128)  # quadratic_spec: acceptance lengths drafted ahead
    revise: Revise | None = None  # diffusion only
    trace: bool = False  # streamed requests: what every forward did, as extra chunks


class StreamOptions(BaseModel):
    include_usage: bool = False


# Fields of the OpenAI API (and vLLM's sampling extensions) that triserve does not implement, each
# with the values that ask for nothing (sending those is fine): any other value is refused with a
# 400 naming the field, never silently dropped.
NOT_SUPPORTED: dict[str, tuple[Any, ...]] = {
    "response_format": (None, {"type": "text"}),
    "tools": (None, []),
    "functions": (None, []),
    "tool_choice": (None, "none", "auto"),
    "function_call": (None, "none", "auto"),
    "audio": (None,),
    "modalities": (None, ["text"]),
    "prediction": (None,),
    "web_search_options": (None,),
}
MAX_CHOICES = 32  # n and best_of
logger = logging.getLogger("ray.serve")
_ignored_logged: set[str] = set()


class CommonRequest(BaseModel):
    """Fields shared by completions and chat completions. Fields of the OpenAI API that triserve
    does not implement get a 400 naming them unless they ask for nothing (``NOT_SUPPORTED``); other
    unknown fields are ignored and logged once each, as vLLM does (OpenAI's SDK may send ones
    triserve does not use). ``extra_body`` contents arrive as top-level fields."""

    model_config = ConfigDict(extra="allow")
    model: str
    max_tokens: int | None = Field(default=None, ge=0)  # 0 only with echo (scoring a prompt)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=-1)  # vLLM's sampling extensions, top_k to stop_token_ids
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=2.0)
    logit_bias: dict[str, float] | None = None  # token id (as a string, as OpenAI sends it) -> bias
    min_tokens: int = Field(default=0, ge=0)
    stop_token_ids: list[int] | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1, le=MAX_CHOICES)
    decoding: Decoding | None = None
    timeout: float | None = Field(default=None, gt=0.0, le=86400.0)  # seconds; the server's limit caps it
    service_tier: str | None = None
    latency_tier: str | None = None
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, value):
        if isinstance(value, str):
            value = [value]
        if value is not None and (len(value) > 4 or any(not s for s in value)):
            raise ValueError("stop must be at most 4 non-empty strings")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, value):
        for key, bias in (value or {}).items():
            if not key.lstrip("-").isdigit():
                raise ValueError(f"logit_bias keys are token ids, not {key!r}")
            if not -100.0 <= bias <= 100.0:
                raise ValueError("logit_bias values must be between -100 and 100")
        return value

    @model_validator(mode="after")
    def _tier(self):
        for name in ("latency_tier", "service_tier"):
            value = getattr(self, name)
            if value is not None:
                value = SERVICE_TIER_ALIASES.get(value, value)
                if value not in TIERS:
                    raise ValueError(f"{name} must be one of {', '.join(TIERS)}")
                setattr(self, name, value)
        return self

    @model_validator(mode="after")
    def _unsupported(self):
        for name, value in (self.model_extra or {}).items():
            if name in NOT_SUPPORTED:
                if value not in NOT_SUPPORTED[name]:
                    raise APIError(400, f"{name} is not supported by this server", param=name, code="unsupported_field")
            elif name not in _ignored_logged:
                _ignored_logged.add(name)
                logger.warning("ignoring the unknown request field %r", name)
        return self

    @property
    def tier(self) -> str:
        return self.latency_tier or self.service_tier or "standard"

    @property
    def stop_list(self) -> list[str]:
        return list(self.stop or [])

    @property
    def controls(self) -> SamplingControls:
        return SamplingControls(
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=max(self.top_k or 0, 0),
            min_p=self.min_p or 0.0,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            logit_bias=tuple((int(k), v) for k, v in (self.logit_bias or {}).items()),
            min_tokens=self.min_tokens,
            stop_token_ids=tuple(self.stop_token_ids or ()),
        )

    @property
    def choices(self) -> int:
        """Sequences decoded per prompt (``best_of`` of them, or ``n``)."""
        return max(self.n, getattr(self, "best_of", None) or 1)


class CompletionRequest(CommonRequest):
    prompt: str | list[int] | list[str] | list[list[int]]
    suffix: str | None = None  # infilling: the text after the completion (diffusion)
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=5)
    best_of: int | None = Field(default=None, ge=1, le=MAX_CHOICES)

    @model_validator(mode="after")
    def _best_of(self):
        if self.best_of is not None and self.best_of < self.n:
            raise ValueError("best_of must be at least n")
        if self.best_of is not None and self.best_of > 1 and self.stream:
            raise ValueError("best_of cannot be used with stream (the best are known only at the end)")
        if len(self.prompts) * self.choices > MAX_BATCH_PROMPTS:
            raise ValueError(f"prompts times best_of (or n) must be at most {MAX_BATCH_PROMPTS}")
        return self

    @property
    def logprobs_count(self) -> int | None:
        """Alternatives per token to report (None: no logprobs)."""
        return self.logprobs

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, value):
        batch = value if _is_batch(value) else [value]
        if not batch or len(batch) > MAX_BATCH_PROMPTS:
            raise ValueError(f"a list of prompts holds 1 to {MAX_BATCH_PROMPTS} of them")
        if any(len(p) == 0 for p in batch):
            raise ValueError("prompt must not be empty")
        return value

    @property
    def prompts(self) -> list[str | list[int]]:
        """The prompts (one choice each): a string or token ids, or a list of either."""
        return list(self.prompt) if _is_batch(self.prompt) else [self.prompt]


def _is_batch(prompt) -> bool:
    return isinstance(prompt, list) and bool(prompt) and isinstance(prompt[0], (str, list))


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None


class ChatRequest(CommonRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)

    @model_validator(mode="after")
    def _top_logprobs(self):
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    @property
    def logprobs_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def output_limit(self) -> int | None:
        limit = self.max_completion_tokens or self.max_tokens
        if limit == 0:
            raise ValueError("max_tokens must be at least 1")
        return limit


class TokenizeRequest(BaseModel):
    """``POST /tokenize`` as vLLM has it: a prompt, or chat messages through the model's template."""

    model_config = ConfigDict(extra="forbid")
    model: str
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    add_special_tokens: bool = True
    add_generation_prompt: bool = True

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("send either prompt or messages")
        return self


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    tokens: list[int]


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def triserve_info(
    model: str, mode: str, block_length: int | None, explored: bool, tier: str, nfe: int, tokens: int
) -> dict[str, Any]:
    """What served a request: ``explored`` marks a router choice made to refresh that option's figures."""
    return {
        "model": model,
        "mode": mode,
        "block_length": block_length,
        "explored": explored,
        "tier": tier,
        "nfe": nfe,
        "tpf": round(tokens / nfe, 4) if nfe else 0.0,
    }
