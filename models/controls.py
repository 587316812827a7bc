"""Sampling controls (vLLM's and OpenAI's): what they do to a row of logits, for a batch of rows at once.

A request's controls turn the model's logits for its next token into the distribution the token is
chosen from, in this order:

1. ``min_tokens``: the stop tokens (EOS and ``stop_token_ids``) get -inf while fewer than
   ``min_tokens`` tokens have been output;
2. ``logit_bias``: added to the named tokens' logits (OpenAI: -100 bans a token, 100 forces it);
3. ``repetition_penalty`` (vLLM's, over the prompt and the output: a seen token's logit is divided by
   it when positive, multiplied when negative), then ``frequency_penalty`` (times the token's count in
   the output) and ``presence_penalty`` (once if it occurs there) subtracted (OpenAI's);
4. the temperature; greedy decoding (temperature 0) takes the argmax here;
5. ``top_k``, ``top_p`` (the smallest set of likeliest tokens whose probability reaches it) and
   ``min_p`` (tokens at least ``min_p`` times as likely as the likeliest) keep a part of the
   distribution, renormalised.

Steps 1-3 depend on the tokens output before the row. A speculative verify reads a block of rows,
row j behind j draft tokens; each row counts those draft tokens as output, exactly as the AR step
that would produce the same token does, so rejection sampling (and the greedy comparison) uses
the distribution AR would sample from: the speculative modes keep AR's output under every control.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingControls:
    top_p: float = 1.0
    top_k: int = 0  # 0 (or -1): every token
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    min_tokens: int = 0
    stop_token_ids: tuple[int, ...] = ()

    def validate(self) -> None:
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < -1:
            raise ValueError("top_k must be -1, 0 (both: off) or positive")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError("min_p must be in [0, 1]")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2]")
        if not 0.0 < self.repetition_penalty <= 2.0 or not math.isfinite(self.repetition_penalty):
            raise ValueError("repetition_penalty must be in (0, 2]")
        if any(not -100.0 <= bias <= 100.0 for _, bias in self.logit_bias):
            raise ValueError("logit_bias values must be in [-100, 100]")
        if self.min_tokens < 0:
            raise ValueError("min_tokens must be non-negative")

    def check_tokens(self, vocab_size: int) -> None:
        """Token ids the controls name must exist in the vocabulary."""
        named = [t for t, _ in self.logit_bias] + list(self.stop_token_ids)
        if any(not 0 <= t < vocab_size for t in named):
            raise ValueError(f"logit_bias and stop_token_ids name token ids in [0, {vocab_size})")

    @property
    def penalised(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)

    @property
    def shapes_logits(self) -> bool:
        """Steps 1-3 do something (otherwise the logits are the model's)."""
        return bool(self.min_tokens or self.logit_bias or self.penalised)

    @property
    def truncates(self) -> bool:
        return self.top_p < 1.0 or self.top_k > 0 or self.min_p > 0.0


NO_CONTROLS = SamplingControls()


@dataclass
class RowsOf:
    """One request's rows in a batch of logits rows, for steps 1-3: ``output`` is what it has output
    before its first row, ``prompt`` its prompt, ``before[j]`` the token output between row j-1 and
    row j (-1: none; ``before[0]`` is ignored), and row j chooses the output's token number
    ``first + j`` (counting from 0: what ``min_tokens`` looks at)."""

    controls: SamplingControls
    stops: tuple[int, ...]
    prompt: list[int]
    output: list[int]
    before: list[int]
    first: int


def shape_logits(logits: torch.Tensor, requests: list[RowsOf]) -> torch.Tensor:
    """Steps 1-3 on logits [R, V] whose rows belong to ``requests`` in order (len(before) rows each);
    a new fp32 tensor. Rows are computed independently of each other, so a row gives the same values
    in any batch."""
    out = logits.float().clone()
    device, vocab = out.device, out.shape[1]
    row_of, ban_rows, ban_tokens, bias_rows, bias_tokens, bias_values = [], [], [], [], [], []
    start = 0
    for b, req in enumerate(requests):
        n, c = len(req.before), req.controls
        row_of += [b] * n
        if c.min_tokens:
            for j in range(max(min(c.min_tokens - req.first, n), 0)):
                ban_rows += [start + j] * len(req.stops)
                ban_tokens += list(req.stops)
        for token, bias in c.logit_bias:
            bias_rows += range(start, start + n)
            bias_tokens += [token] * n
            bias_values += [bias] * n
        start += n
    if bias_rows:
        index = (torch.tensor(bias_rows, device=device), torch.tensor(bias_tokens, device=device))
        out.index_put_(index, torch.tensor(bias_values, dtype=torch.float32, device=device), accumulate=True)
    if any(r.controls.penalised for r in requests):
        out = _penalise(out, requests, row_of, vocab)
    if ban_rows:
        out[torch.tensor(ban_rows, device=device), torch.tensor(ban_tokens, device=device)] = float("-inf")
    return out


def _penalise(out: torch.Tensor, requests: list[RowsOf], row_of: list[int], vocab: int) -> torch.Tensor:
    """Step 3: per row, the counts of each token in the output before it (the request's output plus the
    tokens between its rows), and whether it occurs in the prompt or that output."""
    device = out.device
    items, tokens, seen_items, seen_tokens = [], [], [], []
    before_rows, before_tokens = [], []
    start = 0
    for b, req in enumerate(requests):
        if req.controls.penalised:
            items += [b] * len(req.output)
            tokens += req.output
            if req.controls.repetition_penalty != 1.0:
                seen_items += [b] * len(req.prompt)
                seen_tokens += req.prompt
            for j, token in enumerate(req.before[1:], 1):
                if token >= 0:
                    before_rows.append(start + j)
                    before_tokens.append(token)
        start += len(req.before)
    base = torch.zeros((len(requests), vocab), dtype=torch.float32, device=device)
    if items:
        one = torch.ones(len(items), dtype=torch.float32, device=device)
        base.index_put_((torch.tensor(items, device=device), torch.tensor(tokens, device=device)), one, accumulate=True)
    row_of_t = torch.tensor(row_of, device=device)
    counts = base[row_of_t]
    if before_rows:
        steps = torch.zeros_like(out)
        steps[torch.tensor(before_rows, device=device), torch.tensor(before_tokens, device=device)] = 1.0
        # tokens between rows, summed from each request's first row on (cumsum over the batch, less
        # what the rows of earlier requests added)
        running = steps.cumsum(dim=0)
        firsts, start = [], 0
        for req in requests:
            firsts += [start] * len(req.before)
            start += len(req.before)
        counts = counts + running - running[torch.tensor(firsts, device=device)]
    seen = counts > 0
    if seen_items:
        in_prompt = torch.zeros((len(requests), vocab), dtype=torch.bool, device=device)
        in_prompt[torch.tensor(seen_items, device=device), torch.tensor(seen_tokens, device=device)] = True
        seen = seen | in_prompt[row_of_t]

    def per_row(name: str) -> torch.Tensor:
        values = [getattr(r.controls, name) for r in requests]
        return torch.tensor(values, dtype=torch.float32, device=device)[row_of_t][:, None]

    repetition = per_row("repetition_penalty")
    repeated = torch.where(out > 0, out / repetition, out * repetition)
    out = torch.where(seen, repeated, out)
    return out - per_row("frequency_penalty") * counts - per_row("presence_penalty") * (counts > 0).float()


def truncate(probs: torch.Tensor, controls: list[SamplingControls]) -> torch.Tensor:
    """Step 5 on probabilities [R, V] (row r under ``controls[r]``), renormalised."""
    device = probs.device
    if not any(c.truncates for c in controls):
        return probs
    top_k = torch.tensor([c.top_k if c.top_k > 0 else probs.shape[1] for c in controls], device=device)
    top_p = torch.tensor([c.top_p for c in controls], dtype=torch.float32, device=device)
    min_p = torch.tensor([c.min_p for c in controls], dtype=torch.float32, device=device)
    widest = max(c.top_k for c in controls)
    if all(c.top_k > 0 for c in controls) and widest < probs.shape[1]:  # only the top_k can be kept
        ordered, order = probs.topk(widest, dim=1)
    else:
        ordered, order = probs.sort(dim=1, descending=True)
    rank = torch.arange(ordered.shape[1], device=device)[None, :]
    before = ordered.cumsum(dim=1) - ordered  # probability of the likelier tokens
    keep = (rank < top_k[:, None]) & ((before < top_p[:, None]) | (top_p[:, None] >= 1.0))
    keep &= ordered >= min_p[:, None] * ordered[:, :1]
    keep[:, 0] = True
    kept = torch.zeros_like(probs).scatter(1, order, ordered * keep)
    return kept / kept.sum(dim=1, keepdim=True)
