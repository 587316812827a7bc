"""Single-request entry points: ``generate`` (any mode) and ``score`` (AR log-probabilities).

``generate`` runs the serving engine with one request, so a request computes exactly the same
thing here as beside others on a server.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from models.batch import pack
from models.controls import NO_CONTROLS, SamplingControls
from models.engine import Engine, KVCacheManager
from models.model import TriModeModel
from models.modes import DecodeParams, kv_tokens_needed
from models.modes.base import Score
from models.segments import PromptEmbeds, causal_segment

SEQ_ID = 0


@dataclass
class Generation:
    """Generated ids after the prompt (ending at the first EOS, at most max_new_tokens long)."""

    tokens: list[int]
    nfe: int
    mode: str
    finish_reason: str | None = None
    accepted_lengths: list[int] = field(default_factory=list)
    logprobs: list[Score] | None = None  # with ``logprobs``: per token, (log-probability, alternatives)

    @property
    def tpf(self) -> float:
        """Tokens per forward, drafts included."""
        return len(self.tokens) / self.nfe if self.nfe else 0.0


def _pages_for(tokens: int, page_size: int = 16) -> int:
    return -(-tokens // page_size) + 1


@torch.inference_mode()
def generate(
    model: TriModeModel,
    prompt_ids: list[int] | torch.Tensor,
    *,
    mode: str = "ar",
    max_new_tokens: int = 128,
    block_length: int | None = None,
    threshold: float | None = 0.9,
    max_steps: int | None = None,
    temperature: float = 0.0,
    seed: int | None = None,
    branches: int | None = None,
    revise: float | None = None,
    revise_passes: int = 8,
    controls: SamplingControls = NO_CONTROLS,
    logprobs: int | None = None,
    embeds: PromptEmbeds | None = None,
) -> Generation:
    """Decode one prompt in ``mode``; the same state machines the serving engine runs.

    ``controls``: top_p, penalties, logit_bias, ... (models/controls.py); ``logprobs``: record each
    token's log-probability and that many likeliest alternatives. ``embeds`` replace the embeddings of
    some prompt tokens (a VLM's images, see models/vlm.py)."""
    prompt = prompt_ids.flatten().tolist() if isinstance(prompt_ids, torch.Tensor) else list(prompt_ids)
    params = DecodeParams(
        mode=mode,
        max_new_tokens=max_new_tokens,
        block_length=block_length,
        threshold=threshold,
        max_steps=max_steps,
        temperature=temperature,
        seed=seed,
        branches=branches,
        revise=revise,
        revise_passes=revise_passes,
        controls=controls,
        logprobs=logprobs,
    )
    engine = Engine(
        model,
        num_pages=_pages_for(kv_tokens_needed(len(prompt), params, model.config.block_size)),
        max_running=1,
        max_step_tokens=max(len(prompt), 1),
        prefill_chunk=max(len(prompt), 1),  # the whole prompt in one forward
        prefix_caching=False,
    )
    state = engine.add_request("generate", prompt, params, embeds).state
    while engine.has_work:
        engine.step()
    return Generation(
        tokens=state.tokens,
        nfe=state.nfe,
        mode=mode,
        finish_reason=state.finish_reason,
        accepted_lengths=state.accepted_lengths,
        logprobs=state.logprobs,
    )


def warm_up(model: TriModeModel) -> float:
    """One short decode, so that what the first forward prepares (prepared and fused weights, the RoPE
    table) is ready before the first request, and with a draft adapter one short linear-spec decode,
    which prepares the weights drafts multiply (``models.layers.merge_drafts``: about 75 ms for the
    bundled model, otherwise paid by the first speculative request); returns the seconds it took."""
    start = time.perf_counter()
    prompt = [model.config.bos_token_id or 1]
    generate(model, prompt, mode="ar", max_new_tokens=1)
    if model.has_adapter:
        generate(model, prompt, mode="linear_spec", max_new_tokens=2, block_length=2)
    return time.perf_counter() - start


@torch.inference_mode()
def score(model: TriModeModel, token_ids: list[int] | torch.Tensor, chunk: int = 512) -> list[float]:
    """AR log-probability of every token given the ones before it (``len - 1`` values)."""
    return [lp for lp, _ in score_with_top(model, token_ids, 0, chunk)]


@torch.inference_mode()
def score_with_top(
    model: TriModeModel, token_ids: list[int] | torch.Tensor, top: int, chunk: int = 512
) -> list[tuple[float, dict[int, float]]]:
    """Per token after the first: its AR log-probability and the ``top`` most likely alternatives."""
    ids = token_ids.flatten().tolist() if isinstance(token_ids, torch.Tensor) else list(token_ids)
    if len(ids) < 2:
        return []
    pages = _pages_for(len(ids))
    cache = model.new_cache(pages)
    kv = KVCacheManager(pages, cache.page_size, max_seqs=1, device=model.device, prefix_caching=False)
    kv.add(SEQ_ID)
    out: list[tuple[float, dict[int, float]]] = []
    for start in range(0, len(ids) - 1, chunk):
        piece = ids[start : min(start + chunk, len(ids) - 1)]
        kv.reserve(SEQ_ID, start + len(piece))
        logits = model(pack([(SEQ_ID, causal_segment(piece, start, write=True))], kv, model.device), cache)
        kv.set_length(SEQ_ID, start + len(piece))
        logprobs = torch.log_softmax(logits.double().cpu(), dim=-1)
        targets = torch.tensor(ids[start + 1 : start + 1 + len(piece)])
        chosen = logprobs.gather(-1, targets[:, None]).squeeze(-1).tolist()
        if top:
            values, indices = logprobs.topk(top, dim=-1)
            tops = [dict(zip(i.tolist(), v.tolist())) for i, v in zip(indices, values)]
        else:
            tops = [{} for _ in chosen]
        out.extend(zip(chosen, tops))
    return out
