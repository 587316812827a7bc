"""OpenAI request/response shapes, triserve's extensions, and OpenAI-style errors."""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

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
    "best_of": (None, 1),
    "logit_bias": (None, {}),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "repetition_penalty": (None, 1, 1.0),
    "top_k": (None, -1, 0),
    "min_p": (None, 0, 0.0),
    "min_tokens": (None, 0),
    "stop_token_ids": (None, []),
    "response_format": (None, {"type": "text"}),
    "tools": (None, []),
    "functions": (None, []),
    "tool_choice": (None, "none", "auto"),
    "function_call": (None, "none", "auto"),
    "audio": (None,),
    "modalities": (None, ["text"]),
    "prediction": (None,),
    "web_search_options": (None,),
    "top_logprobs": (None, 0),
    "logprobs": (None, False),  # chat (completions has its own field)
}
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
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1, le=1)
    decoding: Decoding | None = None
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


class CompletionRequest(CommonRequest):
    prompt: str | list[int] | list[str] | list[list[int]]
    suffix: str | None = None  # infilling: the text after the completion (diffusion)
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=5)

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
    messages: list[ChatMessage] | None = None
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
