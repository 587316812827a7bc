"""Batched post-processing: every request's work on a step's logits at once, one copy to the host.

After the forward, the requests of a step ask for AR choices, speculative verifications, drafts
and diffusion unmask passes (``models.modes.base``: ``Verify``, ``Draft``, ``Unmask``). Here each
kind runs once for all requests that want it, on the model's device, through the kernels'
dispatch (``kernels.verify_accept*``, ``kernels.unmask*``: Triton on CUDA, vectorised torch
elsewhere); a quadratic cycle's draft rows, which depend on its acceptance, are picked on the
device and only they get logits. The integers every request needs then reach the host in a
single copy.

Sampling controls (``models.controls``) shape the rows of verifies (AR choices included) and
unmask passes before any choice: logit_bias, penalties and min_tokens only when some request of
the group has them, top_k / top_p / min_p on the probabilities at temperature > 0. Drafts are
proposals and stay unshaped: the verify applies the controls, so the output follows them exactly.
With ``logprobs``, the log-probability of each row's chosen token under the distribution it was
chosen from (and the likeliest alternatives) travel in the same host copy, as float bits.

Temperature > 0: probabilities are fp32 softmaxes on the device. Each request draws its uniform
numbers from its own CPU generator, a fixed number per kind of work (so a seeded request gives the
same tokens alone or beside any neighbours), and they travel to the device with the step. A draw
from a distribution is an inverse-CDF draw with one uniform (``kernels.verify_accept.inverse_cdf``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

import kernels
from kernels.row_stats import row_argmax, row_confidence_native, row_stats_reference, row_top2_native
from kernels.verify_accept import inverse_cdf
from models import matmul
from models.controls import RowsOf, shape_logits, truncate
from models.modes import DecodeState, Draft, Unmask, Verify, Work
from models.modes.base import Score


@dataclass
class Item:
    """One request's work in a step: rows are offsets into the step's logits and deferred rows."""

    state: DecodeState
    work: Work
    row: int
    deferred: int = 0


def _uniforms(item: Item) -> torch.Tensor | None:
    """The item's uniform draws for this step, in a fixed order: accept tests and the draw of a
    verify, then one per draft or unmask slot."""
    state, work = item.state, item.work
    if state.temperature <= 0:
        return None
    verify = work if isinstance(work, Verify) else getattr(work, "verify", None)
    count = len(verify.draft) + 1 if verify is not None else 0
    if isinstance(work, Draft):
        count += work.count
    elif isinstance(work, Unmask):
        count += len(work.block)
    return torch.rand(count, dtype=torch.float64, generator=state.generator)


def _to_device(device: torch.device, *arrays: list) -> list[torch.Tensor]:
    """Integer lists (flat, or lists of equal-length rows) as int64 tensors on ``device``, in one copy."""
    flat: list[int] = []
    shapes = []
    for array in arrays:
        if array and isinstance(array[0], list):
            shapes.append((len(array), len(array[0])))
            for row in array:
                flat += row
        else:
            shapes.append((len(array),))
            flat += array
    sizes = [math.prod(shape) for shape in shapes]
    parts = torch.tensor(flat, dtype=torch.long).to(device).split_with_sizes(sizes)
    return [part.view(shape) for part, shape in zip(parts, shapes)]


def _plain_greedy(item: Item, on_cpu: bool) -> bool:
    """Greedy work with nothing that shapes its logits or scores its tokens: every decode step of an AR
    or speculative request at temperature 0 without logit controls or logprobs, and on the CPU a
    diffusion pass that revises nothing (on a GPU the general path's Triton kernel decides those)."""
    state, work = item.state, item.work
    return (
        (isinstance(work, (Verify, Draft)) or isinstance(work, Unmask) and work.revise is None and on_cpu)
        and state.temperature <= 0
        and state.params.logprobs is None
        and not state.params.controls.shapes_logits
    )


def _argmax(x: torch.Tensor) -> torch.Tensor:
    """``row_argmax``, natively on the fast path."""
    return row_argmax(x, native=matmul.fast_path_on())


def _split_by_temperature(items: list[Item]) -> tuple[list[Item], list[Item]]:
    return [i for i in items if i.state.temperature <= 0], [i for i in items if i.state.temperature > 0]


class Sampler:
    def __init__(self, model, mask_id: int) -> None:
        self.model = model  # for deferred logits (quadratic drafts)
        self.mask_id = mask_id

    @torch.inference_mode()
    def run(self, logits: torch.Tensor, items: list[Item]) -> list[list[int]]:
        """Each item's result integers (see the work classes), with one device-to-host copy; with
        logprobs, the work's ``scores`` are set too (their floats travel in the same copy). In
        inference mode, so that it may work in place on copies of the forward's outputs."""
        if items and all(_plain_greedy(item, logits.device.type == "cpu") for item in items):
            return self._greedy_choices(logits, items)
        device = logits.device
        uniforms = {id(item): _uniforms(item) for item in items}
        pieces: list[torch.Tensor] = []  # device int64 [B, width] each (floats as their bits)
        where: dict[tuple[int, str], tuple[int, int]] = {}  # (item, what) -> (piece, row in piece)

        def collect(group: list[Item], result: torch.Tensor, what: str = "result") -> None:
            for b, item in enumerate(group):
                where[id(item), what] = (len(pieces), b)
            pieces.append(result if result.dtype == torch.long else result.double().view(torch.long))

        def collect_scores(group: list[Item], scores: Scores | None) -> None:
            if scores is not None:
                for what, values in zip(("logprob", "top_ids", "top_logprobs"), scores):
                    collect(group, values, what)

        def collect_guesses(group: list[Item], guesses: Guesses | None) -> None:
            if guesses is not None:
                for what, values in zip(GUESSES, guesses):
                    collect(group, values, what)

        verifying = [i for i in items if isinstance(i.work, Verify) or isinstance(i.work, Draft) and i.work.verify]
        for group in _split_by_temperature(verifying):
            if not group:
                continue
            accepted, token, scores = self._verify(logits, group, uniforms)
            head = torch.stack([accepted, token], dim=1)
            followed = [i for i in group if isinstance(i.work, Draft)]
            if followed:
                positions = [b for b, i in enumerate(group) if isinstance(i.work, Draft)]
                index = torch.tensor(positions, device=device)
                drafts, guesses = self._draft(logits, followed, uniforms, accepted[index], token[index])
                width = drafts.shape[1]
                tail = torch.full((len(group), width), -1, dtype=torch.long, device=device)
                tail[index] = drafts
                head = torch.cat([head, tail], dim=1)
                collect_guesses(followed, guesses)
            collect(group, head)
            collect_scores(group, scores)
        drafting = [i for i in items if isinstance(i.work, Draft) and not i.work.verify]
        for group in _split_by_temperature(drafting):
            if group:
                drafts, guesses = self._draft(logits, group, uniforms, None)
                collect(group, drafts)
                collect_guesses(group, guesses)
        unmasking = [i for i in items if isinstance(i.work, Unmask)]
        for group in _split_by_temperature(unmasking):
            if group:
                blocks, scores = self._unmask(logits, group, uniforms)
                collect(group, blocks)
                collect_scores(group, scores)
        if not pieces:
            return [[] for _ in items]
        offsets, start = [], 0
        for piece in pieces:
            offsets.append(start)
            start += piece.numel()
        flat = torch.cat([p.reshape(-1) for p in pieces]).tolist()  # the one copy to the host

        def values(item: Item, what: str) -> list[int]:
            piece, b = where[id(item), what]
            width = pieces[piece].shape[1]
            return flat[offsets[piece] + b * width : offsets[piece] + (b + 1) * width]

        out = []
        for item in items:
            result = values(item, "result")[: _result_width(item.work)]
            if isinstance(item.work, Draft) and item.work.choose:
                confidence, guess, guess_p = (values(item, what) for what in GUESSES)
                count = item.work.count
                drafted = result[len(result) - count :]
                result += _choices(item.work, drafted, _floats(confidence), guess, _floats(guess_p))
            out.append(result)
            if (id(item), "logprob") in where:
                _scored_work(item.work).scores = _host_scores(
                    values(item, "logprob"), values(item, "top_ids"), values(item, "top_logprobs"), item.state
                )
        return out

    def _greedy_choices(self, logits: torch.Tensor, items: list[Item]) -> list[list[int]]:
        """A step of plain greedy work only (``_plain_greedy``), the common decode step at temperature 0:
        what ``_verify`` and ``_draft`` find, without the tensors a sampled draft or a control needs
        (their dozens of operations of a few microseconds each cost a small model's step on a CPU a fifth
        of its time or more). One argmax over the rows of every verify and of every draft that chooses
        nothing, one copy to the host, each verify's longest agreeing prefix found there (a draft row
        whose argmax is the mask token, which is rare, then takes its best other token); then, for
        drafts that choose acceptance lengths (quadratic's: a draft alone, or the branch its cycle's
        verify selected, whose deferred rows only then go through the output head), one pass over their
        rows for tokens and guesses, one more copy, and the lengths chosen on the host."""
        first = []  # rows of the first pass: verifies and drafts that choose nothing
        for item in items:
            work = item.work
            if isinstance(work, Unmask):
                continue
            if isinstance(work, Verify) or work.verify is not None:
                first += range(item.row, item.row + len(_verify_of(work).draft) + 1)
            elif not work.choose:
                first += range(item.row, item.row + work.count)
        picked = logits
        if first and first != list(range(logits.shape[0])):  # a lone request reads every row in order
            picked = logits.index_select(0, torch.tensor(first, device=logits.device))
        best = _argmax(picked).tolist() if first else []
        out: list[list[int]] = []
        choosing: list[tuple[int, bool, int]] = []  # (item, rows are deferred ones, offset among those)
        rows: dict[bool, list[int]] = {False: [], True: []}  # logit rows, deferred rows of the second pass
        at = 0
        for b, item in enumerate(items):
            work = item.work
            if isinstance(work, Unmask):
                out.append([])  # below
                continue
            if isinstance(work, Draft) and work.verify is None:
                if work.choose:
                    choosing.append((b, False, len(rows[False])))
                    rows[False] += range(item.row, item.row + work.count)
                    out.append([])
                    continue
                tokens = best[at : at + work.count]
                for j in (j for j, token in enumerate(tokens) if token == self.mask_id):  # never the mask
                    row = picked[at + j].clone()
                    row[self.mask_id] = float("-inf")
                    tokens[j] = int(row.argmax())
                at += work.count
                out.append(tokens)
                continue
            draft = _verify_of(work).draft
            tokens, at, accepted = best[at : at + len(draft) + 1], at + len(draft) + 1, 0
            while accepted < len(draft) and draft[accepted] == tokens[accepted]:
                accepted += 1
            out.append([accepted, tokens[accepted]])
            if isinstance(work, Draft):  # a quadratic cycle: the branch drafted for this outcome, if any
                hit = _selected_branch(work, accepted, tokens[accepted])
                if hit is None:
                    out[-1] += [-1] * (work.count + 2 * work.choose)
                else:
                    choosing.append((b, True, len(rows[True])))
                    start = item.deferred + hit * work.count
                    rows[True] += range(start, start + work.count)
        unmasking = [b for b, item in enumerate(items) if isinstance(item.work, Unmask)]
        if unmasking:
            for b, block in zip(unmasking, self._greedy_unmasks(logits, [items[b] for b in unmasking])):
                out[b] = block
        if not choosing:
            return out
        device = logits.device
        parts = [logits.index_select(0, torch.tensor(rows[False], device=device))] if rows[False] else []
        if rows[True]:
            parts.append(self.model.deferred_logits(torch.tensor(rows[True], device=device)))
        tokens, guesses = self._greedy_guesses(torch.cat(parts) if len(parts) > 1 else parts[0])
        host = torch.stack([tokens.double(), *(g.double() for g in guesses)]).tolist()
        for b, deferred, offset in choosing:
            work = items[b].work
            lo = offset + (len(rows[False]) if deferred else 0)
            drafted, confidence, guess, guess_p = (column[lo : lo + work.count] for column in host)
            drafted, guess = [int(t) for t in drafted], [int(t) for t in guess]
            out[b] += drafted + _choices(work, drafted, confidence, guess, guess_p)
        return out

    def _greedy_unmasks(self, logits: torch.Tensor, items: list[Item]) -> list[list[int]]:
        """Greedy diffusion passes that revise nothing: what ``kernels.unmask`` commits, from each masked
        slot's choice and confidence (``row_confidence_native`` on the fast path, else the reference it
        agrees with) in one call for all of them and the commit rule on the host."""
        masked = [[j for j, t in enumerate(i.work.block) if t == self.mask_id] for i in items]
        index = torch.tensor(
            [i.row + r for i, slots in zip(items, masked) for r in range(len(slots))], dtype=torch.long
        )
        rows = logits.index_select(0, index)
        scored = row_confidence_native(rows, self.mask_id) if matmul.fast_path_on() else None
        prob, token = scored if scored is not None else row_stats_reference(rows, self.mask_id)
        prob, token = prob.tolist(), token.tolist()
        out, at = [], 0
        for item, slots in zip(items, masked):
            work, n = item.work, len(slots)
            out.append(_commit(work, slots, prob[at : at + n], token[at : at + n]))
            at += n
        return out

    def _greedy_guesses(self, rows: torch.Tensor) -> tuple[torch.Tensor, Guesses]:
        """Greedy draft tokens of ``rows`` [R, V] (the argmax without the mask token) and their guesses
        (``_guesses``) under the rows' softmax without the mask token: on the fast path one native call
        (``row_top2_native``), else through torch's softmax and topk. Both paths of ``run`` take this."""
        top2 = row_top2_native(rows, self.mask_id) if matmul.fast_path_on() else None
        if top2 is not None:
            index, prob = top2
            return index[:, 0], (prob[:, 0], index[:, 1], prob[:, 1])
        allowed = rows.clone()
        allowed[:, self.mask_id] = float("-inf")
        tokens = _argmax(allowed)
        return tokens, _guesses(torch.softmax(allowed, dim=-1), tokens)

    # ----- the three kinds of work --------------------------------------------------------------------
    def _verify(
        self, logits: torch.Tensor, group: list[Item], uniforms: dict[int, torch.Tensor | None]
    ) -> tuple[torch.Tensor, torch.Tensor, Scores | None]:
        """(accepted [B], token [B], the scores of rows 0..accepted's tokens) on the device."""
        device = logits.device
        verifies = [_verify_of(i.work) for i in group]
        lengths = [len(v.draft) for v in verifies]
        width = max(lengths) + 1
        rows = [[i.row + min(j, n) for j in range(width)] for i, n in zip(group, lengths)]
        drafts = [v.draft + [-1] * (width - 1 - len(v.draft)) for v in verifies]
        rows_t, draft_t, lengths_t = _to_device(device, rows, drafts, lengths)
        histories = [
            _rows_of(i.state, [-1, *d], i.state.tokens + i.state.pending_output()) for i, d in zip(group, drafts)
        ]
        row_logits = _shaped(logits.index_select(0, rows_t.reshape(-1)), histories)
        if group[0].state.temperature <= 0:
            ar = _argmax(row_logits).view(len(group), width)
            if width == 1:  # AR steps only: nothing to accept, each token is its row's argmax
                accepted, tokens = torch.zeros(len(group), dtype=torch.long, device=device), ar
            else:
                accepted, tokens, _ = kernels.verify_accept(draft_t, ar, None, lengths_t)
            log_dist = None
        else:
            probs = self._probs(row_logits, group, width, histories)
            p = probs.view(len(group), width, -1)
            q = p.new_zeros((len(group), width - 1, p.shape[-1]))
            accept_u = torch.zeros((len(group), width - 1), dtype=torch.float64)
            sample_u = torch.zeros(len(group), dtype=torch.float64)
            for b, (item, verify) in enumerate(zip(group, verifies)):
                n = len(verify.draft)
                if n:
                    q[b, :n] = verify.q
                u = uniforms[id(item)]
                accept_u[b, :n], sample_u[b] = u[:n], u[n]
            accepted, tokens, _ = kernels.verify_accept_sampled(
                draft_t, p, q, accept_u.to(device), sample_u.to(device), None, lengths_t
            )
            log_dist = probs.log() if _wants_scores(group) else None
        token = tokens.gather(1, accepted[:, None]).squeeze(1)
        scores = None
        if _wants_scores(group):
            # row j's token: the draft's j-th while accepted, then the token after the accepted prefix
            padded = torch.cat([draft_t, draft_t.new_full((len(group), 1), -1)], dim=1)
            within = torch.arange(width, device=device)[None, :] < accepted[:, None]
            chosen = torch.where(within, padded, token[:, None])
            if log_dist is None:
                log_dist = torch.log_softmax(row_logits.float(), dim=-1)
            scores = _scores(log_dist, chosen.clamp(min=0).view(-1), group, width)
        return accepted, token, scores

    def _draft(
        self,
        logits: torch.Tensor,
        group: list[Item],
        uniforms: dict[int, torch.Tensor | None],
        accepted: torch.Tensor | None,
        bonus: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, Guesses | None]:
        """Per request its draft tokens [B, max count], and, where some request chooses acceptance
        lengths (``Draft.choose``), every draft token's guesses (``_guesses``), from which the host
        chooses them (``likely_acceptances``); sampled drafts set ``work.q_out``.

        With ``accepted`` and ``bonus`` (quadratic), request b's rows are the deferred rows of the
        branch drafted for acceptance length ``accepted[b]`` behind the seed ``bonus[b]`` (or a mask):
        picked on the device, and only they go through the output head; its tokens are -1 when no such
        branch was drafted."""
        device = logits.device
        counts = [i.work.count for i in group]
        width = max(counts)
        starts = [i.row if accepted is None else i.deferred for i in group]
        cols = [[min(j, max(n - 1, 0)) for j in range(width)] for n in counts]  # padding repeats a real row
        choosing = any(i.work.choose for i in group)
        start_t, cols_t, count_t = _to_device(device, starts, cols, counts)
        drafted = None
        if accepted is None:
            allowed = logits.index_select(0, (start_t[:, None] + cols_t).reshape(-1))
        else:
            widest = max(len(i.work.branches) for i in group)
            branches, seeds = _to_device(
                device,
                [i.work.branches + [-1] * (widest - len(i.work.branches)) for i in group],
                [i.work.seeds + [-1] * (widest - len(i.work.seeds)) for i in group],
            )
            hit = (branches == accepted[:, None]) & ((seeds < 0) | (seeds == bonus[:, None]))
            drafted = hit.any(dim=1)
            start_t = start_t + hit.long().argmax(dim=1) * count_t
            allowed = self.model.deferred_logits((start_t[:, None] + cols_t).reshape(-1))
        allowed[:, self.mask_id] = float("-inf")  # a copy of the logits either way (gathered, or the head's output)
        guesses = None
        if group[0].state.temperature <= 0:
            if choosing:
                tokens, guesses = self._greedy_guesses(allowed)
            else:
                tokens = _argmax(allowed)
            tokens = tokens.view(len(group), width)
        else:
            q = self._probs(allowed, group, width)
            u = torch.zeros((len(group), width), dtype=torch.float64)
            for b, item in enumerate(group):
                draws = uniforms[id(item)][-item.work.count :] if item.work.count else u.new_zeros(0)
                u[b, : item.work.count] = draws
            tokens = inverse_cdf(q, u.to(device).view(-1)).view(len(group), width)
            per_item = q.view(len(group), width, -1)
            for b, item in enumerate(group):
                item.work.q_out = per_item[b, : item.work.count]
            if choosing:
                guesses = _guesses(q, tokens)
        if drafted is not None:
            tokens = tokens.masked_fill(~drafted[:, None], -1)
        return tokens, None if guesses is None else tuple(g.view(len(group), width) for g in guesses)

    def _unmask(
        self, logits: torch.Tensor, group: list[Item], uniforms: dict[int, torch.Tensor | None]
    ) -> tuple[torch.Tensor, Scores | None]:
        """The new blocks [B, max L] (padding -1, never a mask id), and per slot the score of the token
        it drew (with logprobs)."""
        device = logits.device
        lengths = [len(i.work.block) for i in group]
        width = max(lengths)
        masked = [[j for j, t in enumerate(i.work.block) if t == self.mask_id] for i in group]  # their rows, in order
        rows = [_slot_rows(i.row, slots, width) for i, slots in zip(group, masked)]
        blocks = [i.work.block + [-1] * (width - n) for i, n in zip(group, lengths)]
        rows_t, blocks_t, least_t = _to_device(device, rows, blocks, [i.work.least or 0 for i in group])
        thresholds = torch.tensor(
            [float("inf") if i.work.threshold is None else i.work.threshold for i in group], dtype=torch.float32
        ).to(device)
        # slot j comes after the block's decided slots before it
        histories = [
            _rows_of(i.state, [-1] + [-1 if t == self.mask_id else t for t in b[:-1]], i.state.tokens)
            for i, b in zip(group, blocks)
        ]
        block_logits = _shaped(logits.index_select(0, rows_t.reshape(-1)), histories)
        revised = self._revised(logits, group, blocks_t, [len(slots) for slots in masked])  # before the commit
        greedy, scored = group[0].state.temperature <= 0, _wants_scores(group)
        if not greedy or scored:  # the distribution drawn from (the greedy kernel excludes the mask itself)
            allowed = block_logits.clone()
            allowed[:, self.mask_id] = float("-inf")
        if greedy:
            scores = None
            if scored:
                log_dist = torch.log_softmax(allowed.float(), dim=-1)
                scores = _scores(log_dist, row_argmax(log_dist), group, width)
            kernels.unmask(blocks_t, block_logits.view(len(group), width, -1), self.mask_id, thresholds, least_t)
            return self._remask(blocks_t, revised), scores
        # a draw for each masked slot only (with the uniform of its slot): nothing reads a decided slot's
        u = torch.cat([uniforms[id(item)][slots] for item, slots in zip(group, masked)])
        (flat,) = _to_device(device, [b * width + j for b, slots in enumerate(masked) for j in slots])
        probs = self._probs(allowed.index_select(0, flat), group, [len(slots) for slots in masked], histories)
        drawn = inverse_cdf(probs, u.to(device))
        sure = torch.softmax(block_logits.index_select(0, flat).float(), dim=-1).gather(1, drawn[:, None]).squeeze(1)
        candidates = blocks_t.reshape(-1).index_copy(0, flat, drawn)
        confidence = torch.zeros(candidates.shape, device=device).index_copy_(0, flat, sure)
        kernels.unmask_commit(
            blocks_t,
            confidence.view(len(group), width),
            candidates.view(len(group), width),
            self.mask_id,
            thresholds,
            least_t,
        )
        if not scored:
            return self._remask(blocks_t, revised), None
        log_dist = torch.zeros_like(block_logits, dtype=torch.float32).index_copy_(0, flat, probs.log())
        return self._remask(blocks_t, revised), _scores(log_dist, candidates, group, width)

    def _revised(
        self, logits: torch.Tensor, group: list[Item], blocks: torch.Tensor, block_rows: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(items, slots) of revisable tokens whose probability in their shadow rows (after each block's
        ``block_rows`` rows) is below the item's ``revise``; None when no item revises."""
        items, slots, rows, limits = [], [], [], []
        for b, (item, before) in enumerate(zip(group, block_rows)):
            work = item.work
            if work.revise is None:
                continue
            for j, slot in enumerate(work.revisable):
                items.append(b)
                slots.append(slot)
                rows.append(item.row + before + j)
                limits.append(work.revise)
        if not items:
            return None
        items_t, slots_t, rows_t = _to_device(logits.device, items, slots, rows)
        tokens = blocks[items_t, slots_t]
        prob = torch.softmax(logits.index_select(0, rows_t).float(), dim=-1).gather(1, tokens[:, None]).squeeze(1)
        low = prob < torch.tensor(limits, dtype=torch.float32).to(logits.device)
        return items_t[low], slots_t[low]

    def _remask(self, blocks: torch.Tensor, revised: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        if revised is not None:
            blocks[revised] = self.mask_id
        return blocks

    @staticmethod
    def _probs(
        rows: torch.Tensor, group: list[Item], per_item: int | list[int], histories: list[RowsOf] | None = None
    ) -> torch.Tensor:
        """fp32 softmax of rows [sum of per_item, V] (``per_item`` rows of each item, or that many for
        all) at each item's temperature; with ``histories`` (target rows, not drafts), kept to each item's
        top_k / top_p / min_p."""
        counts = [per_item] * len(group) if isinstance(per_item, int) else per_item
        temperature = torch.tensor(
            [i.state.temperature for i, n in zip(group, counts) for _ in range(n)], dtype=torch.float32
        ).to(rows.device)
        probs = torch.softmax(rows.float() / temperature[:, None], dim=-1)
        if histories is None:
            return probs
        return truncate(probs, [h.controls for h, n in zip(histories, counts) for _ in range(n)])


def _slot_rows(first: int, masked: list[int], width: int) -> list[int]:
    """Each slot's logit row in an unmask pass whose rows start at ``first``, padded to ``width``: a
    masked slot's own (the pass's rows are its ``masked`` slots, in order); any other slot, whose row
    nothing reads, borrows the first."""
    rows = [first] * width
    for rank, slot in enumerate(masked):
        rows[slot] = first + rank
    return rows


def _verify_of(work: Work) -> Verify:
    return work if isinstance(work, Verify) else work.verify


def _scored_work(work: Work) -> Verify | Unmask:
    """The work whose ``scores`` a request's results carry (a quadratic cycle's: its verify's)."""
    return work.verify if isinstance(work, Draft) else work


def _rows_of(state: DecodeState, before: list[int], output: list[int]) -> RowsOf:
    """A request's rows (``before``: see RowsOf) after ``output``, under its controls."""
    return RowsOf(state.params.controls, state.stop_ids, state.prompt, output, before, len(output))


def _shaped(rows: torch.Tensor, histories: list[RowsOf]) -> torch.Tensor:
    """The rows through the requests' logit-shaping controls; as they are when none has any."""
    if not any(h.controls.shapes_logits for h in histories):
        return rows
    return shape_logits(rows, histories)


def _wants_scores(group: list[Item]) -> bool:
    return any(i.state.params.logprobs is not None for i in group)


Scores = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # logprob [B, W], top ids [B, W * k], top logprobs


def _scores(log_dist: torch.Tensor, chosen: torch.Tensor, group: list[Item], width: int) -> Scores:
    """Per row of ``log_dist`` [B * width, V]: the log-probability of its ``chosen`` token, and the
    group's largest ``logprobs`` count of likeliest alternatives."""
    top = max(i.state.params.logprobs or 0 for i in group)
    batch = len(group)
    logprob = log_dist.gather(1, chosen[:, None]).view(batch, width)
    values, ids = log_dist.topk(top, dim=-1) if top else (log_dist[:, :0], chosen[:, None][:, :0])
    return logprob, ids.reshape(batch, width * top), values.reshape(batch, width * top)


def _host_scores(logprob: list[int], top_ids: list[int], top_values: list[int], state: DecodeState) -> list[Score]:
    """The scores of one request's rows from the host copy (floats arrive as their bits)."""
    as_floats = _floats(logprob + top_values)
    logprobs, values = as_floats[: len(logprob)], as_floats[len(logprob) :]
    k = len(top_ids) // len(logprob)
    wanted = state.params.logprobs or 0
    out = []
    for j, lp in enumerate(logprobs):
        alternatives = [
            (top_ids[j * k + a], values[j * k + a]) for a in range(wanted) if math.isfinite(values[j * k + a])
        ]
        out.append((lp, alternatives))
    return out


Guesses = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # confidence, guess, guess probability per draft row
GUESSES = ("confidence", "guess", "guess_p")


def _guesses(q: torch.Tensor, tokens: torch.Tensor) -> Guesses:
    """Per draft token (``tokens``, -1 where nothing was drafted) of rows ``q`` (its draft distribution):
    its probability, and the token guessed to replace it if the verify rejects it (the likeliest other
    one under ``q``) with that token's probability; each shaped as ``tokens``."""
    drafted = tokens.clamp(min=0).reshape(-1, 1)
    confidence = q.gather(1, drafted)
    top2_p, top2 = q.topk(2, dim=-1)
    other = top2[:, 0:1] == drafted
    guess = torch.where(other, top2[:, 1:2], top2[:, 0:1])
    guess_p = torch.where(other, top2_p[:, 1:2], top2_p[:, 0:1])
    return confidence.view(tokens.shape), guess.view(tokens.shape), guess_p.view(tokens.shape)


def likely_acceptances(
    confidence: list[float], guess: list[int], guess_p: list[float], choose: int
) -> tuple[list[int], list[int]]:
    """For a draft of n tokens with confidences c (their probabilities under the draft) and, per token,
    the token guessed to replace it if it is rejected (``guess``, with probability g): the ``choose``
    acceptance lengths a in 0..n most likely with their guessed next token, if each draft token is
    accepted with its confidence independently: P(a) = c_1 * .. * c_a * g_{a+1} (the verify rejects
    d_{a+1} and puts its guess there), P(n) = c_1 * .. * c_n (every token accepted; what follows is not
    guessed); ties to the shorter. Returns the lengths, ascending, and each one's seed (the guess, or -1
    after a whole draft), both padded with -1 to ``choose``. On the host: a few dozen floats, for which
    tensor operations would cost more than the arithmetic."""
    n = len(confidence)
    log_p, accepted_first = [], 0.0
    for a in range(n + 1):
        log_p.append(accepted_first + (math.log(max(guess_p[a], 1e-30)) if a < n else 0.0))
        if a < n:
            accepted_first += math.log(max(confidence[a], 1e-30))
    lengths = sorted(sorted(range(n + 1), key=lambda a: (-log_p[a], a))[:choose])
    seeds = [guess[a] if a < n else -1 for a in lengths]
    padding = [-1] * (choose - len(lengths))
    return lengths + padding, seeds + padding


def _choices(
    work: Draft, drafted: list[int], confidence: list[float], guess: list[int], guess_p: list[float]
) -> list[int]:
    """A draft's result tail: its ``choose`` likeliest acceptance lengths, then their seeds; all -1 when
    nothing was drafted (a quadratic cycle whose verify's outcome had no branch)."""
    if not drafted or drafted[0] < 0:
        return [-1] * (2 * work.choose)
    count = len(drafted)
    lengths, seeds = likely_acceptances(confidence[:count], guess[:count], guess_p[:count], work.choose)
    return lengths + seeds


def _selected_branch(work: Draft, accepted: int, bonus: int) -> int | None:
    """Which of a quadratic cycle's branches drafted for its verify's outcome (``accepted`` draft tokens,
    then ``bonus``): the first whose acceptance length matches and whose seed is the bonus or a mask;
    None when none did (``_draft`` finds the same on the device)."""
    for k, (length, seed) in enumerate(zip(work.branches, work.seeds)):
        if length == accepted and (seed < 0 or seed == bonus):
            return k
    return None


def _commit(work: Unmask, masked: list[int], prob: list[float], token: list[int]) -> list[int]:
    """``kernels.unmask_commit``'s rule for one block on the host: its masked slots ``masked`` with their
    candidates' confidences (fp32 values) commit the ``max(1, #confident, least)`` most confident (at
    most all of them; ties to the earlier slot), confident meaning at least the fp32 threshold."""
    block = list(work.block)
    if not masked:
        return block
    limit = math.inf if work.threshold is None else torch.tensor(work.threshold, dtype=torch.float32).item()
    count = min(max(1, sum(p >= limit for p in prob), work.least or 0), len(masked))
    for rank in sorted(range(len(masked)), key=lambda r: -prob[r])[:count]:  # a stable sort
        block[masked[rank]] = token[rank]
    return block


def _floats(bits: list[int]) -> list[float]:
    """float64 values that travelled to the host as their int64 bits (``collect``)."""
    return torch.tensor(bits, dtype=torch.long).view(torch.float64).tolist()


def _result_width(work: Work) -> int:
    if isinstance(work, Verify):
        return 2
    if isinstance(work, Draft):
        return work.count + (2 if work.verify else 0)  # the chosen lengths follow from the host (``_choices``)
    return len(work.block)
