"""Shaping what the engine produced into OpenAI responses: stop strings, logprobs,
trace events with text, server-sent events."""

from __future__ import annotations

import json
from typing import Any

from deployments.served import ServedModel
from models.engine.detokenizer import IncrementalDetokenizer
from models.modes.base import Score


async def prompt_scores(model: ServedModel, prompt: list[int], top: int) -> list[Score | None]:
    """The prompt's scores (AR log-probabilities, one prefill; None for its first token, which has
    none): what ``echo`` with ``logprobs`` reports, lm-eval's loglikelihood."""
    scored = await model.backend.score(prompt, top)
    return [None] + [(lp, list(alternatives.items())) for lp, alternatives in scored]


def completion_logprobs(tokenizer, ids: list[int], scores: list[Score | None], top: int, offset: int) -> dict[str, Any]:
    """OpenAI completions ``logprobs`` of ``ids`` (each token's text, log-probability, ``top``
    alternatives by their text, offset in the choice's text counting from ``offset``)."""
    tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
    for token, score in zip(ids, scores):
        piece = tokenizer.decode([token])
        tokens.append(piece)
        offsets.append(offset)
        offset += len(piece)
        token_logprobs.append(None if score is None else score[0])
        alternatives = None if score is None or not top else {tokenizer.decode([t]): v for t, v in score[1]}
        top_logprobs.append(alternatives)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs, "text_offset": offsets}


def chat_logprobs(tokenizer, ids: list[int], scores: list[Score]) -> dict[str, Any]:
    """OpenAI chat ``logprobs``: per token its text, bytes, log-probability and alternatives."""

    def entry(token: int, logprob: float) -> dict[str, Any]:
        piece = tokenizer.decode([token])
        return {"token": piece, "logprob": logprob, "bytes": list(piece.encode("utf-8"))}

    content = []
    for token, (logprob, alternatives) in zip(ids, scores):
        content.append({**entry(token, logprob), "top_logprobs": [entry(t, v) for t, v in alternatives]})
    return {"content": content}


def trace_view(tokenizer, events: list[dict[str, Any]], tracer: IncrementalDetokenizer, final: bool) -> list[dict]:
    """Trace events with token ids as text: ``emitted`` through the request's own incremental
    detokenizer (so the emitted texts of all events join into the generated text), block slots and
    drafts one token each (None: a masked slot)."""
    out = []
    for i, event in enumerate(events):
        view = dict(event)
        view["emitted"] = tracer.push(event["emitted"])
        if final and i == len(events) - 1:
            view["emitted"] += tracer.flush()
        if "block" in event:
            view["block"] = [None if t is None else tokenizer.decode([t]) for t in event["block"]]
        for key in ("draft", "next_draft"):
            if key in event:
                view[key] = [tokenizer.decode([t]) for t in event[key]]
        out.append(view)
    return out


class StopStrings:
    """Cuts generated text at the first stop string, looking only at new text and the few characters
    before it, and holds back a tail that could be the start of one until it is decided."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.context = max((len(s) for s in self.stops), default=1) - 1  # sent characters a stop may span
        self.sent_tail = ""
        self.held = ""

    def feed(self, text: str, final: bool) -> tuple[str, bool]:
        """New text in; (text to send now, whether a stop string ended the output) out."""
        pending = self.held + text
        if not self.stops:
            return pending, False
        window = self.sent_tail + pending
        hits = [i for i in (window.find(s) for s in self.stops) if i >= 0]
        if hits:
            return pending[: max(min(hits) - len(self.sent_tail), 0)], True
        keep = 0 if final else self._possible_start(pending)
        out, self.held = pending[: len(pending) - keep], pending[len(pending) - keep :]
        self.sent_tail = (self.sent_tail + out)[-self.context :] if self.context else ""
        return out, False

    def _possible_start(self, text: str) -> int:
        """Length of the longest end of ``text`` that is a proper beginning of a stop string."""
        for k in range(min(self.context, len(text)), 0, -1):
            if any(s.startswith(text[-k:]) for s in self.stops):
                return k
        return 0


def sse(payload: dict[str, Any] | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"
