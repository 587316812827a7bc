"""``infill``: the middle between a prefix and a suffix, decoded by block diffusion.

How long the middle is cannot be known in advance, and the family has no token that means "nothing
here" (it was not trained with one). So several lengths are decoded, each as its own request with
the suffix in its last block's window (``models.modes.infill``), all batched in the same engine
steps and sharing the prefix's cached pages. Each candidate is rated by the AR model on two counts:
how likely the suffix's first block is after it (log P(suffix head | prefix, middle): how well it
leads into the suffix) and how fluent it is itself (its mean log-probability per token, the suffix
token after it included, so an empty middle is rated too), weighted ``MIDDLE_WEIGHT``; the best
rated is kept. The joint probability of middle and suffix was tried first and keeps the shortest
middles (every extra token costs probability; a mean does not): on held-out code it restored lines
worse than AR without the suffix; the suffix head alone restored them better, and with the mean
better still (bench/RESULTS.md). A middle that commits an end-of-text token ends there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from models.generate import score
from models.model import TriModeModel
from models.modes import DecodeParams

EXACT_LENGTHS = 16  # every middle length up to this is tried; longer ones on a grid growing by a quarter
# weight of a middle's mean log-probability beside the suffix head's: on 200 held-out lines weights
# 0.8-3.2 each restored lines better than the suffix head alone, 1.6 about best (bench/RESULTS.md)
MIDDLE_WEIGHT = 1.6


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
    fluency: float = -math.inf  # AR mean log-probability of the middle's tokens and the suffix token after them

    def rate(self, prefix_len: int, logprobs: list[float]) -> None:
        """Set ``logprob`` and ``fluency`` from the AR log-probabilities of the ids ``scored_text``
        gives (one per id after the first, as ``models.generate.score`` returns them)."""
        first = prefix_len + len(self.tokens)  # the suffix's first id
        self.logprob = sum(logprobs[first - 1 :])
        along = logprobs[prefix_len - 1 : first]
        self.fluency = sum(along) / len(along)

    @property
    def rating(self) -> float:
        return self.logprob + MIDDLE_WEIGHT * self.fluency


def middle_of(tokens: list[int], eos_id: int | None) -> list[int]:
    return tokens[: tokens.index(eos_id)] if eos_id is not None and eos_id in tokens else list(tokens)


def scored_text(prefix: list[int], middle: list[int], suffix: list[int], block_length: int) -> list[int]:
    """The ids a candidate is rated on: prefix, middle and the suffix's first block."""
    return prefix + middle + suffix[:block_length]


def best_rated(candidates: list[Middle]) -> Middle:
    """The candidate with the highest rating (the shorter one on a tie)."""
    return max(candidates, key=lambda c: (c.rating, -len(c.tokens)))


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
        candidate = Middle(m, middle, state.nfe)
        candidate.rate(len(prefix), score(model, scored_text(prefix, middle, suffix, block)))
        candidates.append(candidate)
    return Infill(best_rated(candidates).tokens, candidates)
