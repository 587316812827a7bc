"""The per-request decoding state machine shared by every mode.

``plan()`` returns the segments the request contributes to the next forward; ``advance(logits)``
consumes their logits, emits tokens, and moves ``cached_len`` (the committed KV length: the
runner rolls the cache back to it). The prompt prefill (optionally in chunks) is common to all
modes; each mode implements what follows.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from models.config import ModelConfig
from models.sampling import pick
from models.segments import PromptEmbeds, Segment, causal_segment

MODES = ("ar", "diffusion", "linear_spec", "quadratic_spec")


@dataclass(frozen=True)
class DecodeParams:
    """What a request asks of the decoder. ``block_length=None`` means the checkpoint's block_size."""

    mode: str = "ar"
    max_new_tokens: int = 128
    block_length: int | None = None
    threshold: float | None = 0.9
    max_steps: int | None = None
    temperature: float = 0.0
    seed: int | None = None
    prefill_chunk: int | None = None  # tokens of prompt per step (None: whole prompt at once)

    def validate(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; expected one of {', '.join(MODES)}")
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")
        if self.block_length is not None and not 1 <= self.block_length <= 1024:
            raise ValueError("block_length must be between 1 and 1024")
        if self.mode in ("linear_spec", "quadratic_spec", "diffusion") and self.block_length == 1:
            raise ValueError(f"{self.mode} needs block_length of at least 2")
        if self.threshold is not None and not 0.0 <= self.threshold <= 1.0:
            raise ValueError("threshold must be between 0 and 1")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError("max_steps must be at least 1")
        if self.temperature < 0:
            raise ValueError("temperature must be non-negative")
        if self.prefill_chunk is not None and self.prefill_chunk < 1:
            raise ValueError("prefill_chunk must be at least 1")


def kv_tokens_needed(prompt_len: int, params: DecodeParams, block_size: int) -> int:
    """Cache a request can occupy at worst: prompt, output, and one block written past the output
    (a verify block, a quadratic cycle's verify tokens or a diffusion block's tail)."""
    block = params.block_length or block_size
    overshoot = 1 if params.mode == "ar" else block + 1
    return prompt_len + params.max_new_tokens + overshoot


class DecodeState(ABC):
    """One request's progress: emitted tokens, committed cache length, forward count."""

    mode: str = ""
    prefill_counts_as_forward = False  # the official accounting counts it for the spec modes only

    def __init__(
        self, prompt: list[int], params: DecodeParams, config: ModelConfig, embeds: PromptEmbeds | None = None
    ) -> None:
        params.validate()
        if not prompt:
            raise ValueError("prompt must contain at least one token")
        self.prompt = list(prompt)
        self.embeds = embeds  # image embeddings on prompt placeholders (VLM): part of the prefill only
        self.params = params
        self.config = config
        self.block_length = params.block_length or config.block_size
        self.mask_id = config.mask_token_id
        self.eos_id = config.eos_token_id
        self.temperature = params.temperature
        self.generator: torch.Generator | None = None
        if params.temperature > 0:
            seed = params.seed if params.seed is not None else random.getrandbits(63)
            self.generator = torch.Generator().manual_seed(seed)
        self.tokens: list[int] = []
        self.cached_len = 0
        self.nfe = 0
        self.accepted_lengths: list[int] = []  # tokens emitted per speculative cycle
        self.finished = False
        self.finish_reason: str | None = None

    # ----- protocol --------------------------------------------------------------------------
    @property
    def prefilling(self) -> bool:
        return self.cached_len < len(self.prompt)

    def plan(self) -> list[Segment]:
        if self.finished:
            return []
        if self.prefilling:
            chunk = self.params.prefill_chunk or len(self.prompt)
            stop = min(self.cached_len + chunk, len(self.prompt))
            last = stop == len(self.prompt)
            segment = causal_segment(
                self.prompt[self.cached_len : stop],
                self.cached_len,
                write=True,
                logit_rows=[stop - self.cached_len - 1] if last else [],
            )
            part = self.embeds.within(self.cached_len, stop) if self.embeds is not None else None
            if part is not None:
                segment.embeds_rows, segment.input_embeds = part
            return [segment]
        return self.plan_decode()

    def advance(self, logits: list[torch.Tensor]) -> list[int]:
        """Consume the logits of the planned segments (one tensor per segment); return new tokens."""
        if self.prefilling:
            chunk = self.params.prefill_chunk or len(self.prompt)
            self.cached_len = min(self.cached_len + chunk, len(self.prompt))
            if self.prefilling:
                return []
            self.nfe += int(self.prefill_counts_as_forward)
            return self.after_prefill(logits[0][-1])
        return self.advance_decode(logits)

    # ----- mode hooks ----------------------------------------------------------------------------
    @abstractmethod
    def after_prefill(self, last_logits: torch.Tensor) -> list[int]: ...

    @abstractmethod
    def plan_decode(self) -> list[Segment]: ...

    @abstractmethod
    def advance_decode(self, logits: list[torch.Tensor]) -> list[int]: ...

    # ----- helpers -----------------------------------------------------------------------------
    def choose(self, logits: torch.Tensor) -> int:
        """The AR choice for one row: argmax, or a sample at temperature > 0."""
        return int(pick(logits, self.temperature, self.generator))

    @property
    def remaining(self) -> int:
        return self.params.max_new_tokens - len(self.tokens)

    def emit(self, new: list[int]) -> list[int]:
        """Append tokens, stopping at the first EOS or at max_new_tokens."""
        out: list[int] = []
        for token in new:
            if self.finished:
                break
            out.append(token)
            self.tokens.append(token)
            if self.eos_id is not None and token == self.eos_id:
                self.finish("stop")
            elif len(self.tokens) >= self.params.max_new_tokens:
                self.finish("length")
        return out

    def finish(self, reason: str) -> None:
        self.finished = True
        self.finish_reason = reason

    @property
    def tpf(self) -> float:
        return len(self.tokens) / self.nfe if self.nfe else 0.0
