"""``infill``: the middle between a prefix and a suffix, decoded by block diffusion.

How long the middle is cannot be known in advance, and the family has no token that means "nothing
here" (it was not trained with one). So several lengths are decoded, each as its own request with
the suffix in its last block's window (``models.modes.infill``), all batched in the same engine
steps and sharing the prefix's cached pages; the kept middle is the one after which the AR model
finds the suffix's first block likeliest (log P(suffix head | prefix, middle)): the middle that
leads into the suffix best. The joint probability of middle and suffix was tried first and keeps
the shortest middles (every extra token costs probability): on held-out code it restored lines
worse than AR without the suffix (bench/RESULTS.md). A middle that commits an end-of-text token
ends there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from models.generate import score
from models.model import TriModeModel
from models.modes import DecodeParams

EXACT_LENGTHS = 16  # every middle length up to this is tried; longer ones on a grid growing by a quarter


def middle_lengths(max_middle: int) -> list[int]:
    """The middle lengths tried for a bound of ``max_middle`` tokens."""
    if max_middle < 1:
        raise ValueError("max_middle_tokens must be at least 1")
    lengths = list(range(1, min(max_middle, EXACT_LENGTHS) + 1))
    while lengths[-1] < max_middle:
        lengths.append(min(max_middle, math.ceil(lengths[-1] * 1.25)))
    return lengths


@dataclass
class Middle:
    length: int  # the middle length it was decoded at
    tokens: list[int]  # its middle, cut before an end-of-text token
    nfe: int
    logprob: float = -math.inf  # AR log-probability of the suffix's first block after prefix and middle


def middle_of(tokens: list[int], eos_id: int | None) -> list[int]:
    return tokens[: tokens.index(eos_id)] if eos_id is not None and eos_id in tokens else list(tokens)


def scored_text(prefix: list[int], middle: list[int], suffix: list[int], block_length: int) -> tuple[list[int], int]:
    """The ids a candidate is scored on, and the index of the first scored one (the suffix's start)."""
    return prefix + middle + suffix[:block_length], len(prefix) + len(middle)


def likeliest(candidates: list[Middle]) -> Middle:
    """The candidate with the highest log-probability (the shorter one on a tie)."""
    return max(candidates, key=lambda c: (c.logprob, -len(c.tokens)))


@dataclass
class Infill:
    tokens: list[int]  # the chosen middle
    candidates: list[Middle] = field(default_factory=list)

    @property
    def nfe(self) -> int:
        """Forwards over all candidates (each batched with the others in the engine's steps)."""
        return sum(c.nfe for c in self.candidates)


@torch.inference_mode()
def infill(
    model: TriModeModel,
    prefix_ids: list[int],
    suffix_ids: list[int],
    max_middle_tokens: int = 16,
    *,
    block_length: int | None = None,
    threshold: float | None = 0.9,
    max_steps: int | None = None,
    temperature: float = 0.0,
    seed: int | None = None,
    lengths: list[int] | None = None,
) -> Infill:
    """Decode the middle between ``prefix_ids`` and ``suffix_ids`` (see the module docstring);
    ``lengths`` overrides the middle lengths tried (default ``middle_lengths(max_middle_tokens)``)."""
    from models.engine import Engine

    prefix, suffix = list(prefix_ids), list(suffix_ids)
    if not prefix or not suffix:
        raise ValueError("infilling needs a non-empty prefix and suffix")
    lengths = lengths or middle_lengths(max_middle_tokens)
    block = block_length or model.config.block_size
    params = [
        DecodeParams(
            mode="diffusion",
            max_new_tokens=m,
            block_length=block_length,
            threshold=threshold,
            max_steps=max_steps,
            temperature=temperature,
            seed=seed,
            suffix=tuple(suffix),
        )
        for m in lengths
    ]
    page = 16
    pages = -(-len(prefix) // page) + len(lengths) * (-(-(max(lengths) + block + 1) // page) + 1)
    engine = Engine(model, num_pages=pages, page_size=page, max_running=len(lengths))
    states = [engine.add_request("0", prefix, params[0]).state]
    while states[0].prefilling or not states[0].started:  # the others then share its cached prompt
        engine.step()
    states += [engine.add_request(str(i), prefix, p).state for i, p in enumerate(params[1:], 1)]
    while engine.has_work:
        engine.step()
    candidates = []
    for m, state in zip(lengths, states):
        middle = middle_of(state.tokens, model.config.eos_token_id)
        ids, first = scored_text(prefix, middle, suffix, block)
        candidate = Middle(m, middle, state.nfe, sum(score(model, ids)[first - 1 :]))
        candidates.append(candidate)
    return Infill(likeliest(candidates).tokens, candidates)
