"""Segments: the unit of work one request contributes to one forward pass (ARCHITECTURE.md §3).

A prefill chunk, an AR token, a diffusion denoise pass, a draft block, a verify block and a
quadratic cycle are all segments. A step packs the segments of many requests into one forward;
each request gets back the logits of its own segments.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch

from kernels.masks import MaskKind, segment_mask

__all__ = ["MaskKind", "Segment", "segment_mask"]


@dataclass
class Segment:
    """A run of query tokens of one request.

    ``positions`` continue the request's sequence; ``prefix_len`` cached tokens are visible to every
    query. Tokens flagged in ``write`` have their keys/values stored in the cache at index
    == position (only causal passes over committed tokens write, so the cache never holds a
    key/value that a causal pass would not have produced). ``adapter`` switches the draft adapter on
    for flagged tokens. ``logit_rows`` selects which rows need logits (None: all rows);
    ``deferred_rows`` are rows whose logits the step may ask for only once it has read the others
    (a quadratic cycle's drafts: which sub-block is read depends on how much of the draft is accepted).
    """

    tokens: list[int]
    positions: list[int]
    kind: MaskKind
    prefix_len: int
    write: list[bool]
    adapter: list[bool]
    logit_rows: list[int] | None = None
    deferred_rows: list[int] | None = None
    input_embeds: torch.Tensor | None = field(default=None, repr=False)  # rows replacing embeddings (VLM)
    embeds_rows: list[int] | None = None

    def __post_init__(self) -> None:
        n = len(self.tokens)
        if not (len(self.positions) == len(self.write) == len(self.adapter) == n) or n == 0:
            raise ValueError("segment fields must be non-empty and of equal length")

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def read_rows(self) -> range | list[int]:
        """The rows whose logits a forward returns for this segment, in order."""
        return range(len(self)) if self.logit_rows is None else self.logit_rows


@dataclass
class PromptEmbeds:
    """Embeddings that replace some prompt tokens' (a VLM's image placeholders), by prompt index."""

    rows: list[int]  # ascending prompt indices
    values: torch.Tensor  # [len(rows), hidden]

    def within(self, start: int, stop: int) -> tuple[list[int], torch.Tensor] | None:
        """The rows in prompt[start:stop] (relative to ``start``) and their vectors, so a prefill chunk
        that cuts through an image carries exactly its own part of the embeddings."""
        picked = [i for i, r in enumerate(self.rows) if start <= r < stop]
        if not picked:
            return None
        return [self.rows[i] - start for i in picked], self.values[picked[0] : picked[-1] + 1]

    def digest(self, start: int, stop: int) -> bytes:
        """What the keys/values of prompt[start:stop] depend on besides token ids (for prefix caching):
        a digest of the embeddings placed there and where, or b"" when none is."""
        part = self.within(start, stop)
        if part is None:
            return b""
        rows, values = part
        h = hashlib.sha256(repr(rows).encode())
        h.update(values.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
        return h.digest()


def block_segment(
    kind: MaskKind,
    tokens: list[int],
    start: int,
    *,
    write: bool = False,
    adapter: bool = False,
    logit_rows: list[int] | None = None,
    deferred_rows: list[int] | None = None,
) -> Segment:
    """Contiguous tokens from position ``start`` right after the cached prefix of that length."""
    n = len(tokens)
    return Segment(
        tokens=list(tokens),
        positions=list(range(start, start + n)),
        kind=kind,
        prefix_len=start,
        write=[write] * n,
        adapter=[adapter] * n,
        logit_rows=logit_rows,
        deferred_rows=deferred_rows,
    )


def causal_segment(tokens: list[int], start: int, **kwargs) -> Segment:
    """Prefill, AR step, verify block, diffusion commit: causal, usually writing the cache."""
    return block_segment(MaskKind.CAUSAL, tokens, start, **kwargs)


def bidirectional_segment(tokens: list[int], start: int, **kwargs) -> Segment:
    """Diffusion denoise pass or draft: bidirectional, never written to the cache."""
    return block_segment(MaskKind.BIDIRECTIONAL, tokens, start, write=False, **kwargs)
