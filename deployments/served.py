"""What the OpenAI layer knows of a served model: its spec, configs, tokenizer and how to reach it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

from deployments.config import ModelSpec
from models.config import ModelConfig
from models.vlm import VLMConfig


class Backend(Protocol):
    """How the service reaches one model's replicas."""

    def generate(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]: ...

    async def score(self, token_ids: list[int], top: int) -> list[tuple[float, dict[int, float]]]: ...

    async def stats(self) -> dict[str, Any]: ...


@dataclass
class ServedModel:
    spec: ModelSpec
    config: ModelConfig
    tokenizer: Any
    backend: Backend
    vision: VLMConfig | None = None  # set for a VLM: it takes image_url parts

    @property
    def size(self) -> float:
        return self.spec.size or self.config.num_parameters
