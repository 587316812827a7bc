"""Decoding modes as per-request state machines (ARCHITECTURE.md §2-3)."""

from __future__ import annotations

from models.config import ModelConfig
from models.modes.ar import ARState
from models.modes.base import MODES, DecodeParams, DecodeState, Draft, Plan, Unmask, Verify, Work, kv_tokens_needed
from models.modes.diffusion import DiffusionState
from models.modes.infill import InfillState
from models.modes.linear_spec import LinearSpecState
from models.modes.quadratic_spec import QuadraticSpecState
from models.segments import PromptEmbeds

STATES: dict[str, type[DecodeState]] = {
    "ar": ARState,
    "diffusion": DiffusionState,
    "linear_spec": LinearSpecState,
    "quadratic_spec": QuadraticSpecState,
}

SPECULATIVE_MODES = tuple(mode for mode, state in STATES.items() if state.speculative)

__all__ = [
    "MODES",
    "SPECULATIVE_MODES",
    "DecodeParams",
    "DecodeState",
    "Draft",
    "Plan",
    "Unmask",
    "Verify",
    "Work",
    "kv_tokens_needed",
    "make_state",
]


def make_state(
    prompt: list[int], params: DecodeParams, config: ModelConfig, embeds: PromptEmbeds | None = None
) -> DecodeState:
    """The state machine of ``params.mode`` for one request (``embeds``: image embeddings of a VLM prompt)."""
    params.validate()
    state = InfillState if params.suffix else STATES[params.mode]
    return state(prompt, params, config, embeds)
