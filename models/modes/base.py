"""The per-request decoding state machine shared by every mode.

``plan(budget)`` returns what the request contributes to the next step: its segments and the
*work* to do on their logits (an AR choice, a speculative verification, a draft, an unmask step).
It does not change the state, so a scheduler may plan a request and then leave it out. The engine
runs the step's forward and then all requests' work in one batched call on the device
(``models.engine.sampler``), copies the results to the host once, and hands each request its
integers in ``advance(plan, result)``, which emits tokens and moves ``cached_len`` (the committed
KV length: the engine rolls the cache back to it).

Prefill is common to all modes and is what a request does whenever its cache holds less than
``ready_len``: at the start (the prompt, in chunks the scheduler sizes), and after a preemption
dropped its cache (the prompt and every committed output token are recomputed, with no logits:
decoding then resumes exactly where it stopped).
"""

from __future__ import annotations

import math
import random
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from models.config import ModelConfig
from models.controls import NO_CONTROLS, SamplingControls
from models.segments import PromptEmbeds, Segment, bidirectional_segment, causal_segment

MODES = ("ar", "diffusion", "linear_spec", "quadratic_spec")

WINDOW_CYCLES = 2  # speculative cycles a request finishes with whole-draft verifies before its window adapts
WINDOW_HISTORY = 8  # its latest cycles the window follows
WINDOW_FLOOR = 4  # verify rows at least (the verify block's first token and three drafts)


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
    branches: int | None = None  # quadratic_spec: acceptance lengths drafted ahead per cycle (None: default)
    suffix: tuple[int, ...] = ()  # diffusion: text after the output (infilling; the output is the middle)
    revise: float | None = None  # diffusion: re-mask a decided slot whose confidence falls below this
    revise_passes: int = 8  # diffusion: at most this many denoise passes may re-mask (extra passes bound)
    trace: bool = False  # record what every forward did (``DecodeState.trace``)
    controls: SamplingControls = NO_CONTROLS  # top_p, penalties, logit_bias, ... (models/controls.py)
    logprobs: int | None = None  # record each output token's log-probability and this many alternatives
    explored: bool = False  # a router exploration: speculate as asked, never judged by its own cycles

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
        if self.branches is not None and self.branches < 1:
            raise ValueError("branches must be at least 1")
        if self.suffix and self.mode != "diffusion":
            raise ValueError(f"a suffix (infilling) needs mode diffusion, not {self.mode}")
        if self.revise is not None and self.mode != "diffusion":
            raise ValueError(f"revise needs mode diffusion, not {self.mode}")
        if self.revise is not None and not 0.0 < self.revise < 1.0:
            raise ValueError("revise (a confidence) must be between 0 and 1, exclusive")
        if self.revise_passes < 0:
            raise ValueError("revise_passes must be non-negative")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise ValueError("logprobs (alternatives per token) must be between 0 and 20")
        self.controls.validate()


def kv_tokens_needed(prompt_len: int, params: DecodeParams, block_size: int) -> int:
    """Cache a request can occupy at worst: prompt, output, and one block written past the output
    (a verify block, a quadratic cycle's verify tokens or a diffusion block's tail)."""
    block = params.block_length or block_size
    overshoot = 1 if params.mode == "ar" else block + 1
    return prompt_len + params.max_new_tokens + overshoot


Score = tuple[float, list[tuple[int, float]]]  # a token's log-probability, and the likeliest alternatives


# ----- work on a step's logits (rows are relative to the request's own logit rows) ------------------
@dataclass
class Verify:
    """Speculative acceptance of ``draft`` against the AR predictions in logit rows 0..len(draft)
    (greedy: the longest agreeing prefix; sampled: rejection sampling with the draft's ``q``).
    Result ``[accepted, token]``: the token after the accepted prefix. An empty draft is a plain
    AR choice from row 0."""

    draft: list[int] = field(default_factory=list)
    q: torch.Tensor | None = None  # [len(draft), V] draft probabilities (sampled drafts)
    scores: list[Score] | None = None  # with logprobs: rows 0..accepted, each its output token's score


@dataclass
class Draft:
    """Draft tokens from diffusion logits (never the mask token): rows 0..count-1, or, after a
    ``verify`` of the same step, the deferred rows of the branch the acceptance selects (quadratic:
    the plan drafted ahead for the acceptance lengths ``branches`` behind the bonus tokens ``seeds``
    (-1: a mask), ``count`` deferred rows each, in that order). Result ``[*tokens, *lengths, *seeds]``
    (after the verify's two): the tokens are all -1 when no branch was drafted for the actual
    acceptance and bonus; ``lengths`` are the ``choose`` acceptance lengths of the new draft most likely
    under its own confidences (ascending), where the next cycle should draft ahead, and ``seeds`` the
    bonus token guessed for each. Sampled drafts leave their probabilities in ``q_out`` for the next
    verify."""

    count: int
    verify: Verify | None = None
    branches: list[int] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    choose: int = 0
    q_out: torch.Tensor | None = None


@dataclass
class Unmask:
    """One diffusion denoise pass over ``block``: commit the most confident masked slot and every one at
    or above ``threshold``, at least ``least`` of them; then, with ``revise``, mask again each slot of
    ``revisable`` (decided by earlier passes) whose token has a probability below ``revise`` in the
    logit rows after the block's (one per revisable slot: a shadow pass with those slots masked).
    The block's logit rows are its masked slots only, in order: nothing reads a decided slot's.
    Result: the new block."""

    block: list[int]
    threshold: float | None
    least: int | None
    revise: float | None = None
    revisable: list[int] = field(default_factory=list)
    scores: list[Score] | None = None  # with logprobs: per slot, the score of the token it drew this pass


Work = Verify | Draft | Unmask

MAX_HOLD = 64  # AR steps a request whose own cycles do not pay waits, at most, before it tries one again


@dataclass
class SpeculationRecord:
    """What a speculative request's own cycles have yielded lately, and when it may speculate again.

    An option's figures say what speculation yields on average; one request's drafts may be accepted
    far less (a model whose drafter fits other text, a stretch of text no draft guesses). The
    engine's rule (models/engine/costs.py::record_pays) compares the request's recent tokens per
    forward with AR's step cost; when its cycles do not pay, the request takes AR steps (lossless by
    construction) for ``backoff`` of them and then tries one cycle, the wait doubling while cycles
    keep failing (up to ``MAX_HOLD``) and reset by one that pays. Tokens and forwards are averaged
    per cycle with weight ``WEIGHT`` on the latest, so a stretch where drafts start to land is seen
    after a cycle or two."""

    WEIGHT = 0.5

    tokens: float | None = None  # tokens a cycle emitted (the bonus and any draft-less forward's token too)
    forwards: float | None = None  # forwards it took (a linear cycle: 2; a quadratic cycle: 1, or 2 after a miss)
    cycles: int = 0
    judged: int = 0  # cycles seen by the last judgement
    hold_until: int = 0  # the request's demoted-step count from which it may try a cycle again
    backoff: int = 1

    def observe(self, tokens: int, forwards: int) -> None:
        w = self.WEIGHT
        self.tokens = tokens if self.tokens is None else (1 - w) * self.tokens + w * tokens
        self.forwards = forwards if self.forwards is None else (1 - w) * self.forwards + w * forwards
        self.cycles += 1

    @property
    def tpf(self) -> float | None:
        return None if not self.forwards else self.tokens / self.forwards

    def allows(self, demoted_steps: int, pays: Callable[[float], bool]) -> bool:
        """Whether the request may start a cycle now: not while it holds; otherwise the latest cycles
        are judged once by ``pays(tpf)`` (a request without a finished cycle may always try)."""
        if demoted_steps < self.hold_until:
            return False
        if self.tpf is None or self.judged == self.cycles:
            return True
        self.judged = self.cycles
        if pays(self.tpf):
            self.backoff = 1
            return True
        self.hold_until = demoted_steps + self.backoff
        self.backoff = min(2 * self.backoff, MAX_HOLD)
        return False


def ar_step(token: int, cached_len: int, demoted: bool = False) -> Plan:
    """One causal row behind ``token``, written to the cache: an AR step, which is also the verify
    of an empty draft (result ``[0, next token]``)."""
    return Plan([causal_segment([token], cached_len, write=True)], Verify(), demoted=demoted)


def draft_segment(first: int, start: int, length: int, mask_id: int, **kwargs) -> Segment:
    """``[first, M x (length - 1)]`` at ``start`` with the draft adapter: a draft behind ``first``, its
    logits read at rows 1.. unless ``kwargs`` (``bidirectional_segment``'s) say otherwise."""
    kwargs.setdefault("logit_rows", list(range(1, length)))
    return bidirectional_segment([first] + [mask_id] * (length - 1), start, adapter=True, **kwargs)


def unmask_changes(before: list[int], after: list[int], mask_id: int) -> tuple[list[int], list[int]]:
    """The slots a denoise pass committed (masked before, not after) and re-masked (the reverse)."""
    committed = [i for i, (b, a) in enumerate(zip(before, after)) if b == mask_id != a]
    remasked = [i for i, (b, a) in enumerate(zip(before, after)) if b != mask_id == a]
    return committed, remasked


@dataclass
class Plan:
    """A request's part of one step: its segments and the work on their logits (None: nothing to read)."""

    segments: list[Segment]
    work: Work | None
    prefill_stop: int | None = None  # a prefill chunk: the cache length it reaches
    demoted: bool = False  # a speculative request's plain AR step, taken in a crowded batch (``speculate``)

    @property
    def num_tokens(self) -> int:
        return sum(len(s) for s in self.segments)

    @property
    def write_extent(self) -> int:
        """Cache length the segments write up to (pages must be reserved before the forward)."""
        ends = [p + 1 for seg in self.segments for p, w in zip(seg.positions, seg.write) if w]
        return max(ends, default=0)


class DecodeState(ABC):
    """One request's progress: emitted tokens, committed cache length, forward count."""

    mode: str = ""
    prefill_counts_as_forward = False  # the official accounting counts it for the spec modes only
    speculative = False  # drafts and verifies: honours ``speculate``

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
        params.controls.check_tokens(config.vocab_size)
        eos = () if self.eos_id is None else (self.eos_id,)
        self.stop_ids = tuple(dict.fromkeys(eos + params.controls.stop_token_ids))  # end the output (EOS first)
        self.temperature = params.temperature
        self.generator: torch.Generator | None = None
        if params.temperature > 0:
            seed = params.seed if params.seed is not None else random.getrandbits(63)
            self.generator = torch.Generator().manual_seed(seed)
        self.tokens: list[int] = []
        # with params.logprobs: one score per output token, from the distribution it was chosen from
        self.logprobs: list[Score] | None = [] if params.logprobs is not None else None
        self.cached_len = 0
        self.ready_len = len(self.prompt)  # cache length needed before the next decode step
        self.started = False  # the prompt's logits have been read
        self.nfe = 0
        self.accepted_lengths: list[int] = []  # tokens emitted per speculative cycle
        # Set by the scheduler before each step. False in a crowded batch, where a speculative mode's
        # rows cost more than its accepted tokens save, or while its own cycles do not pay (``record``):
        # it then finishes the cycle under way and takes plain AR steps (lossless by construction).
        self.speculate = True
        self.demoted_steps = 0  # AR steps taken for that reason or because its own cycles did not pay ...
        self.held_steps = 0  # ... these for the latter (within a hold of ``record``)
        self.record = SpeculationRecord()  # what its own cycles yield (the engine's rule reads it)
        self._cycle_start = (0, 0)  # (nfe, tokens) where the cycle under way began
        self.finished = False
        self.finish_reason: str | None = None
        # with params.trace: one event per forward (``trace_event``), taken away by whoever reports them
        self.trace: list[dict] | None = [] if params.trace else None

    # ----- protocol --------------------------------------------------------------------------
    @property
    def prefilling(self) -> bool:
        return self.cached_len < self.ready_len

    def token_at(self, start: int, stop: int) -> list[int]:
        """Ids at positions ``start..stop-1`` of the sequence (prompt, then emitted tokens)."""
        p = len(self.prompt)
        if stop <= p:
            return self.prompt[start:stop]
        return self.prompt[start:] + self.tokens[max(start - p, 0) : stop - p]

    def plan(self, budget: int) -> Plan | None:
        """The request's part of the next step (None once finished); a prefill chunk takes at most
        ``budget`` tokens (at least one), decode steps are whole."""
        if self.finished:
            return None
        if self.prefilling:
            start = self.cached_len
            stop = min(self.ready_len, start + max(budget, 1))
            last = stop == self.ready_len and not self.started
            segment = causal_segment(
                self.token_at(start, stop), start, write=True, logit_rows=[stop - start - 1] if last else []
            )
            part = self.embeds.within(start, stop) if self.embeds is not None else None
            if part is not None:
                segment.embeds_rows, segment.input_embeds = part
            return Plan([segment], Verify() if last else None, prefill_stop=stop)
        return self.plan_decode()

    def advance(self, plan: Plan, result: list[int]) -> list[int]:
        """Consume the results of a planned step's work; return the newly emitted tokens."""
        emitted = self._advance(plan, result)
        if self.trace is not None:
            self.trace.append(trace_event(self, plan, result, emitted))
        return emitted

    def _advance(self, plan: Plan, result: list[int]) -> list[int]:
        if plan.demoted:
            self.held_steps += self.demoted_steps < self.record.hold_until
            self.demoted_steps += 1
        if plan.prefill_stop is not None:
            self.cached_len = plan.prefill_stop
            if self.prefilling or self.started:
                return []
            self.started = True
            self.nfe += int(self.prefill_counts_as_forward)
            emitted = self.after_prefill(result[1], plan.work.scores)
            self._cycle_start = (self.nfe, len(self.tokens))
            return emitted
        cycles = len(self.accepted_lengths)
        emitted = self.advance_decode(plan, result)
        ended = len(self.accepted_lengths) > cycles
        if ended:  # a cycle ended: what it took since the last one ended
            self.record.observe(len(self.tokens) - self._cycle_start[1], self.nfe - self._cycle_start[0])
        if plan.demoted or ended:
            self._cycle_start = (self.nfe, len(self.tokens))
        return emitted

    def preempt(self) -> None:
        """The request's cache was dropped: recompute it before decoding resumes."""
        self.ready_len = max(self.ready_len, self.cached_len)
        self.cached_len = 0

    # ----- mode hooks ----------------------------------------------------------------------------
    @abstractmethod
    def after_prefill(self, token: int, scores: list[Score] | None) -> list[int]:
        """``token``: the AR choice after the prompt (``scores``: its score, with logprobs)."""

    @abstractmethod
    def plan_decode(self) -> Plan: ...

    @abstractmethod
    def advance_decode(self, plan: Plan, result: list[int]) -> list[int]: ...

    # ----- helpers -----------------------------------------------------------------------------
    @property
    def context_needed(self) -> int:
        """Positions the request may occupy: its prompt and its output."""
        return len(self.prompt) + self.params.max_new_tokens

    @property
    def remaining(self) -> int:
        return self.params.max_new_tokens - len(self.tokens)

    def pending_output(self) -> list[int]:
        """Tokens decided but not yet emitted that the next step's rows come after (its controls'
        output so far is ``tokens`` and these)."""
        return []

    def emit(self, new: list[int], scores: list[Score] | None = None) -> list[int]:
        """Append tokens (and, with logprobs, their ``scores``), stopping at the first stop token
        (EOS or ``stop_token_ids``) or at max_new_tokens."""
        out: list[int] = []
        for i, token in enumerate(new):
            if self.finished:
                break
            out.append(token)
            self.tokens.append(token)
            if self.logprobs is not None:
                self.logprobs.append(scores[i])
            if token in self.stop_ids:
                self.finish("stop")
            elif len(self.tokens) >= self.params.max_new_tokens:
                self.finish("length")
        return out

    def accept(self, draft: list[int], accepted: int, bonus: int, scores: list[Score] | None) -> list[int]:
        """A verify's outcome (``draft`` empty: an AR step): emit the accepted drafts and the bonus
        token, and commit the cache up to them (the verify block's first token is committed too)."""
        emitted = self.emit([*draft[:accepted], bonus], scores)
        if draft:
            self.accepted_lengths.append(accepted + 1)
        self.cached_len += accepted + 1
        return emitted

    def verify_window(self) -> int:
        """Draft tokens the next verify checks (the speculative modes): all of the block's for the first
        ``WINDOW_CYCLES`` cycles; then verify rows (the window plus the block's first token) for twice
        the tokens the latest cycles emitted on average, rounded up to a power of two (at least
        ``WINDOW_FLOOR``), so a cycle that accepts more than usual still fits and the window grows with
        acceptance. Any window emits the same tokens: greedy acceptance stops at the first disagreement
        and sampled acceptance tests each position on its own, so a shorter one only ends a cycle
        earlier."""
        drafted = self.block_length - 1
        recent = self.accepted_lengths[-WINDOW_HISTORY:]
        if len(recent) < WINDOW_CYCLES:
            return drafted
        rows = max(WINDOW_FLOOR, 2 * sum(recent) / len(recent))
        return min(drafted, (1 << math.ceil(math.log2(rows))) - 1)

    def finish(self, reason: str) -> None:
        self.finished = True
        self.finish_reason = reason

    @property
    def tpf(self) -> float:
        return len(self.tokens) / self.nfe if self.nfe else 0.0


def trace_event(state: DecodeState, plan: Plan, result: list[int], emitted: list[int]) -> dict:
    """What one forward did for a request, for ``decoding.trace``: its ``kind`` (prefill, ar,
    denoise, commit, draft, verify), the tokens it emitted, and ``start``, where the active block
    begins in the output. A denoise pass adds the ``block`` after it (None: still masked), the slots
    it ``committed`` and ``remasked`` and ``output_slots`` (the slots after those are not output: the
    infilling suffix, or past max_tokens); a verify adds the ``draft`` and how many were ``accepted``,
    a draft (and a quadratic verify) the new ``draft``."""
    work = plan.work
    event: dict = {"forward": state.nfe, "kind": "prefill", "emitted": list(emitted)}
    event["start"] = len(state.tokens) - len(emitted)
    if plan.prefill_stop is not None:
        return event
    if isinstance(work, Unmask):
        committed, remasked = unmask_changes(work.block, result, state.mask_id)
        event.update(
            kind="denoise",
            block=[None if t == state.mask_id else t for t in result],
            committed=committed,
            remasked=remasked,
            output_slots=min(len(result), state.params.max_new_tokens - event["start"]),
        )
    elif isinstance(work, Draft):
        verify = work.verify
        if verify is not None:
            event.update(kind="verify", draft=list(verify.draft), accepted=result[0])
        else:
            event["kind"] = "draft"
        tokens = result[2:] if verify is not None else result
        event["next_draft" if verify is not None else "draft"] = [t for t in tokens[: work.count] if t >= 0]
    elif isinstance(work, Verify):
        if work.draft:
            event.update(kind="verify", draft=list(work.draft), accepted=result[0])
        else:
            event["kind"] = "commit" if state.mode == "diffusion" else "ar"
    return event
