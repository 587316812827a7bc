"""The tri-mode model: a Ministral-3 decoder with one untied ``diffusion_head``.

One network, three attention patterns. ``forward`` runs a packed batch of segments over the paged
KV cache (serving); ``forward_dense`` runs whole sequences with an explicit mask (training,
scoring tests). Both use the same modules, so a checkpoint loads once and serves every mode.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import kernels
from models import matmul, native_forward
from models.batch import StepBatch
from models.config import ModelConfig
from models.kv_cache import PagedKVCache
from models.layers import LoraWeights, RMSNorm, Rotary, SwiGLU, adapted_linear, identity, linear
from models.matmul import Product

# Projections a draft adapter may target (PEFT's short names) and where they sit in a decoder layer.
# The official drafter targets o_proj only; triserve's own may add the MLP's three.
ADAPTER_MODULES = {
    "o_proj": "self_attn.o_proj",
    "gate_proj": "mlp.gate_proj",
    "up_proj": "mlp.up_proj",
    "down_proj": "mlp.down_proj",
}


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scale = config.head_dim**-0.5
        self.q_proj = nn.Linear(config.hidden_size, config.q_size, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, config.kv_size, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, config.kv_size, bias=False)
        self.o_proj = nn.Linear(config.q_size, config.hidden_size, bias=False)
        self.lora: LoraWeights | None = None
        self.reduce = identity  # tensor parallelism replaces this with an all-reduce

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, qscale: torch.Tensor | None):
        """x [T, H] -> roped, scaled q [T, Hq, D] and roped k, plain v [T, Hkv, D]."""
        t = x.shape[0]
        qkv = linear(x, self.q_proj.weight, self.k_proj.weight, self.v_proj.weight)
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = qkv.split_with_sizes([q_size, kv_size, kv_size], -1)
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        q, k = kernels.rope(q, k, cos, sin, qscale, native=matmul.fast_path_on())
        return q, k, v

    def output(self, attn: torch.Tensor, adapter_rows: torch.Tensor | None) -> torch.Tensor:
        return self.reduce(adapted_linear(attn, (self.o_proj.weight,), (self.lora,), adapter_rows))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size)

    def set_lora(self, module: str, weights: LoraWeights) -> None:
        """Attach a draft adapter's factors to one of ``ADAPTER_MODULES``."""
        if module == "o_proj":
            self.self_attn.lora = weights
        else:
            self.mlp.lora[module] = weights


def embedding(rows: int, hidden: int) -> nn.Embedding:
    """``nn.Embedding(rows, hidden)`` with its own N(0, 1) start, except on the meta device (a model about
    to be loaded), where there is nothing to fill and ``normal_`` would import torch._dynamo (about 1 s
    of a process's first load)."""
    weight = torch.empty(rows, hidden)
    if not weight.is_meta:
        nn.init.normal_(weight)
    return nn.Embedding(rows, hidden, _weight=weight)


class Encoder(nn.Module):
    """Named like the checkpoint (``encoder.*``) so state-dict keys map one to one."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class TriModeModel(nn.Module):
    """Weights of a tri-mode checkpoint plus the two forward paths."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.diffusion_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rotary = Rotary(config.rope, config.head_dim)
        self.tokenizer = None  # set by the loader when the folder has one
        self.source: str | None = None
        self.embed = self._embed_tokens  # vocab parallelism replaces this
        self.head = self._head_logits
        self.deferred: torch.Tensor | None = None  # final hidden states of the last forward's deferred rows
        # the last forward's draft head (None: the model's) and which of its deferred rows are drafts
        self.deferred_drafts: tuple[Product | None, frozenset[int]] = (None, frozenset())
        # speculative drafts' products in int8 where the native CPU forward and the CPU's VNNI instructions
        # serve them (models/native_forward.py): cheaper drafts, the same emitted tokens
        self.int8_drafts = False

    # ----- pieces shared by both paths ---------------------------------------------------------
    def _embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.encoder.embed_tokens(tokens)

    def _head_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return linear(hidden, self.diffusion_head.weight).float()

    @property
    def dtype(self) -> torch.dtype:
        return self.diffusion_head.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.diffusion_head.weight.device

    @property
    def has_adapter(self) -> bool:
        first = self.encoder.layers[0]
        return first.self_attn.lora is not None or bool(first.mlp.lora)

    def new_cache(self, num_pages: int, page_size: int = 16) -> PagedKVCache:
        """A KV pool sized for this model (kv heads as held by this process)."""
        attn = self.encoder.layers[0].self_attn
        return PagedKVCache(
            self.config.num_hidden_layers,
            attn.num_kv_heads,
            self.config.head_dim,
            num_pages=num_pages,
            page_size=page_size,
            dtype=self.dtype,
            device=self.device,
        )

    # ----- serving path ------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, batch: StepBatch, cache: PagedKVCache) -> torch.Tensor:
        """Run a packed step; write committed keys/values; return logits [R, vocab] (fp32).

        The final hidden states of ``batch.deferred_rows`` are kept for :meth:`deferred_logits`."""
        x = self.embed(batch.tokens)
        if batch.embed_rows is not None:
            x = x.index_copy(0, batch.embed_rows, batch.embed_values.to(x.dtype))
        cos, sin, qscale = self.rotary.lookup(batch.positions, x.dtype, batch.position_limit)
        native = matmul.fast_path_on()  # the compiled CPU kernels, with the other fast-path backends
        decoder = native_forward.decoder_for(self) if native else None
        if decoder is not None:  # the final norm too, on the rows read
            hidden, self.deferred = decoder(x.contiguous(), cos, sin, qscale, batch, cache)
            self.deferred_drafts = (decoder.draft_head, frozenset(batch.deferred_drafts))
            return self._logits(hidden, batch.logit_drafts, decoder.draft_head)
        x = self._layers(x, cos, sin, qscale, batch, cache, native)
        deferred = batch.deferred_rows
        self.deferred = None if deferred is None else self.encoder.norm(x.index_select(0, deferred))
        self.deferred_drafts = (None, frozenset())
        hidden = self.encoder.norm(x.index_select(0, batch.logit_rows))
        return self.head(hidden)

    def _logits(self, hidden: torch.Tensor, drafts: list[int], draft_head: Product | None) -> torch.Tensor:
        """The head on final hidden states, the rows at positions ``drafts`` through ``draft_head`` where
        there is one. Both products give a row the same logits in any call, so a row's logits depend on
        whether it is a draft's, never on what shares the forward."""
        if draft_head is None or not drafts:
            return self.head(hidden)
        if len(drafts) == hidden.shape[0]:
            return draft_head(hidden)
        is_draft = torch.zeros(hidden.shape[0], dtype=torch.bool)
        is_draft[drafts] = True
        logits = torch.empty((hidden.shape[0], self.config.vocab_size), dtype=torch.float32)
        logits[~is_draft] = self.head(hidden[~is_draft])
        logits[is_draft] = draft_head(hidden[is_draft])
        return logits

    def _layers(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        qscale: torch.Tensor | None,
        batch: StepBatch,
        cache: PagedKVCache,
        native: bool,
    ) -> torch.Tensor:
        """The decoder layers of a serving forward in PyTorch (models/native_forward.py runs them in C)."""
        adapter_rows = batch.adapter_rows if batch.adapter_rows.numel() else None
        for index, layer in enumerate(self.encoder.layers):
            attn = layer.self_attn
            q, k, v = attn.project(layer.input_layernorm(x), cos, sin, qscale)
            k_cache, v_cache = cache.layers[index]
            kernels.kv_write(k_cache, v_cache, k, v, batch.write_rows, batch.write_slots)
            o = kernels.segment_attention(q, k, v, k_cache, v_cache, batch.attention, attn.scale, native)
            x = x + attn.output(o.reshape(o.shape[0], -1), adapter_rows)
            x = x + layer.mlp.reduce(layer.mlp(layer.post_attention_layernorm(x), adapter_rows))
        return x

    @torch.inference_mode()
    def deferred_logits(self, index: torch.Tensor) -> torch.Tensor:
        """Logits [len(index), vocab] of the last forward's deferred rows picked by ``index`` (positions
        in ``batch.deferred_rows``): the head runs only on rows a step turned out to read."""
        draft_head, drafts = self.deferred_drafts
        picked = index.tolist() if draft_head is not None else []
        return self._logits(self.deferred.index_select(0, index), [i for i, p in enumerate(picked) if p in drafts],
                            draft_head)  # fmt: skip

    # ----- dense path (training) ---------------------------------------------------------------
    def forward_dense(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor,
        adapter: torch.Tensor | None = None,
        input_embeds: torch.Tensor | None = None,
        embeds_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids [B, N], positions [N], boolean mask [N, N] (query, key) -> logits [B, N, vocab].

        Differentiable; attention through SDPA. ``adapter`` [N] flags draft-adapter tokens.
        ``input_embeds`` [B, N, H] replace the token embeddings where ``embeds_mask`` [B, N] is set (images).
        """
        bsz, n = input_ids.shape
        x = self.encoder.embed_tokens(input_ids)
        if input_embeds is not None:
            x = torch.where(embeds_mask[..., None], input_embeds.to(x.dtype), x)
        x = x.reshape(bsz * n, -1)
        cos, sin, qscale = self.rotary(positions.repeat(bsz), x.dtype)
        adapter_rows = None
        if adapter is not None and bool(adapter.any()):
            adapter_rows = (adapter.nonzero().flatten()[None, :] + n * torch.arange(bsz)[:, None]).flatten()
        for layer in self.encoder.layers:
            attn = layer.self_attn
            q, k, v = attn.project(layer.input_layernorm(x), cos, sin, qscale)
            q, k, v = (t.view(bsz, n, t.shape[1], t.shape[2]).transpose(1, 2) for t in (q, k, v))
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scale, enable_gqa=True)
            x = x + attn.output(o.transpose(1, 2).reshape(bsz * n, -1), adapter_rows)
            x = x + layer.mlp.reduce(layer.mlp(layer.post_attention_layernorm(x), adapter_rows))
        return self.head(self.encoder.norm(x)).view(bsz, n, -1)
