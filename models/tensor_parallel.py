"""Tensor parallelism over plain ``torch.distributed`` (NCCL on GPUs, gloo on CPU); Ray-free.

Sharding follows the Megatron layout, so each decoder layer costs two all-reduces:

- q/k/v and gate/up are column-parallel (each rank owns whole heads / a slice of the MLP width),
  o and down are row-parallel and all-reduce their output (``Attention.reduce``/``SwiGLU.reduce``);
- KV heads are split across ranks, so each rank's paged KV pool holds only its own heads;
- the embedding and ``diffusion_head`` are vocab-parallel: an embedding row is looked up on the
  rank that owns the id and all-reduced; the head computes this rank's vocabulary columns and
  gathers them on rank 0 only (the modes need whole fp32 rows there: softmax confidence, sampling
  and speculative rejection all read the full distribution, and the rows are few: only the
  positions a step asks logits for);
- the draft adapter is sharded like the projections it updates: on o_proj and down_proj lora_A is
  split along its input and lora_B whole, so the update joins the partial sum before the same
  all-reduce; on gate_proj and up_proj lora_A is whole and lora_B split like their outputs.

Execution: rank 0 owns everything that decides (scheduler, page tables, modes). Each forward it
broadcasts one small command (the ``StepBatch`` and a cache id) to every other rank, which runs
the same forward on its own KV shard in :func:`follow`; the collectives inside the forward line
up because all ranks run the same layers in the same order. When a step reads deferred rows (a
quadratic cycle's drafts, chosen after its verification), a second command names them, and every
rank runs the vocab-parallel head on just those rows. :class:`TensorParallelModel` is rank
0's face of the group and looks like a ``TriModeModel`` to ``run_step``, the engine and
``generate``, so none of them knows about tensor parallelism.
"""

from __future__ import annotations

import itertools
import threading
import weakref
from collections import deque
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from models.batch import StepBatch
from models.config import ModelConfig
from models.kv_cache import PagedKVCache
from models.layers import linear
from models.loading import Selector, load_model
from models.model import TriModeModel, embedding
from models.vlm import VisionLanguageModel, load_vlm, read_config

_COLUMN_PARALLEL = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "gate_proj.weight", "up_proj.weight")
_ROW_PARALLEL_MODULES = ("o_proj", "down_proj")
_ROW_PARALLEL = tuple(f"{module}.weight" for module in _ROW_PARALLEL_MODULES)
_VOCAB_PARALLEL = ("encoder.embed_tokens.weight", "diffusion_head.weight")


def shard_range(size: int, world: int, rank: int) -> tuple[int, int]:
    """Rank's ``[start, stop)`` of ``size`` items; the first ``size % world`` ranks get one more.

    Only the vocabulary may split unevenly (the VLM's 131073 ids); heads and widths must divide.
    """
    base, extra = divmod(size, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def check_shardable(config: ModelConfig, world: int) -> None:
    """Raise a clear error when ``world`` ranks cannot split this model's heads and MLP width."""
    if world < 1:
        raise ValueError(f"tensor_parallel_size must be at least 1, got {world}")
    for what, size in (
        ("num_attention_heads", config.num_attention_heads),
        ("num_key_value_heads", config.num_key_value_heads),
        ("intermediate_size", config.intermediate_size),
    ):
        if size % world:
            raise ValueError(
                f"{what} ({size}) is not divisible by tensor_parallel_size ({world}); "
                f"choose a tensor_parallel_size that divides {size}"
            )


def slice_selector(config: ModelConfig, rank: int, world: int, prefix: str = "") -> Selector:
    """``load_model``'s ``select``: read only this rank's slice of each checkpoint tensor.

    safetensors' ``get_slice`` copies just the requested rows/columns out of the mapped file, so
    no rank ever materialises a whole tensor it does not own. Only names under ``prefix`` (the
    decoder's, ``language_model.`` in a VLM) are sharded; anything else (a vision tower) is whole.
    """
    vocab_start, vocab_stop = shard_range(config.vocab_size, world, rank)

    def even(size: int) -> slice:
        part = size // world
        return slice(rank * part, (rank + 1) * part)

    def select(name: str, tensor_slice: Any) -> torch.Tensor:
        shape = tensor_slice.get_shape()
        if not name.startswith(("adapter.", prefix)):
            return tensor_slice[:]
        if not name.startswith("adapter."):
            name = name[len(prefix) :]
        if name.startswith("adapter."):  # sharded like the projection it updates
            row_parallel = any(f"{module}.lora_" in name for module in _ROW_PARALLEL_MODULES)
            if name.startswith("adapter.A."):  # input side: split where the projection's input is
                return tensor_slice[:, even(shape[1])] if row_parallel else tensor_slice[:]
            return tensor_slice[:] if row_parallel else tensor_slice[even(shape[0])]
        if name.endswith(_ROW_PARALLEL):
            return tensor_slice[:, even(shape[1])]
        if name in _VOCAB_PARALLEL:
            return tensor_slice[vocab_start:vocab_stop]
        if name.endswith(_COLUMN_PARALLEL):
            return tensor_slice[even(shape[0])]
        return tensor_slice[:]  # norms: replicated

    return select


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum a row-parallel partial output over all ranks (the swap-in for ``layers.identity``)."""
    x = x.contiguous()
    dist.all_reduce(x)
    return x


def _vocab_parallel_embed(embedding: nn.Embedding, start: int) -> Any:
    def embed(tokens: torch.Tensor) -> torch.Tensor:
        local = tokens - start
        outside = (local < 0) | (local >= embedding.num_embeddings)
        x = F.embedding(local.masked_fill(outside, 0), embedding.weight)
        return all_reduce(x.masked_fill(outside[:, None], 0))  # exactly one rank contributes each row

    return embed


def _vocab_parallel_head(head: nn.Linear, config: ModelConfig, rank: int, world: int) -> Any:
    """Local vocabulary logits, gathered on rank 0 into full rows (other ranks get their own part)."""
    width = -(-config.vocab_size // world)  # gather needs equal sizes: pad the shorter shards
    sizes = [stop - start for start, stop in (shard_range(config.vocab_size, world, r) for r in range(world))]

    def logits(hidden: torch.Tensor) -> torch.Tensor:
        local = linear(hidden, head.weight).float()
        padded = F.pad(local, (0, width - local.shape[1])).contiguous()
        if rank != 0:
            dist.gather(padded, dst=0)
            return local
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.gather(padded, parts, dst=0)
        return torch.cat([part[:, :size] for part, size in zip(parts, sizes)], dim=1)

    return logits


def build_sharded(config: ModelConfig, rank: int, world: int) -> TriModeModel:
    """``load_model``'s ``build``: a model whose linears, embedding and head hold one rank's shard."""
    check_shardable(config, world)
    model = TriModeModel(config)
    hidden, head_dim = config.hidden_size, config.head_dim
    vocab_start, vocab_stop = shard_range(config.vocab_size, world, rank)
    model.encoder.embed_tokens = embedding(vocab_stop - vocab_start, hidden)
    model.diffusion_head = nn.Linear(hidden, vocab_stop - vocab_start, bias=False)
    for layer in model.encoder.layers:
        attn = layer.self_attn
        attn.num_heads //= world
        attn.num_kv_heads //= world
        attn.q_proj = nn.Linear(hidden, attn.num_heads * head_dim, bias=False)
        attn.k_proj = nn.Linear(hidden, attn.num_kv_heads * head_dim, bias=False)
        attn.v_proj = nn.Linear(hidden, attn.num_kv_heads * head_dim, bias=False)
        attn.o_proj = nn.Linear(attn.num_heads * head_dim, hidden, bias=False)
        attn.reduce = all_reduce
        mlp = layer.mlp
        width = config.intermediate_size // world
        mlp.gate_proj = nn.Linear(hidden, width, bias=False)
        mlp.up_proj = nn.Linear(hidden, width, bias=False)
        mlp.down_proj = nn.Linear(width, hidden, bias=False)
        mlp.reduce = all_reduce
    model.embed = _vocab_parallel_embed(model.encoder.embed_tokens, vocab_start)
    model.head = _vocab_parallel_head(model.diffusion_head, config, rank, world)
    return model


def init_rank(rank: int, world: int, address: str, port: int, *, backend: str, timeout_s: float = 300.0) -> None:
    """Join the group (``backend``: "nccl" on GPUs, "gloo" on CPU) whose rank 0 listens on ``address:port``.

    Which network interface gloo/NCCL use comes from ``GLOO_SOCKET_IFNAME``/``NCCL_SOCKET_IFNAME``
    in the environment (the worker group sets them). The timeout bounds how long a collective
    waits for a rank that died.
    """
    dist.init_process_group(
        backend,
        init_method=f"tcp://{address}:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=timeout_s),
    )


def control_group() -> dist.ProcessGroup | None:
    """The group that carries rank 0's commands: gloo (CPU objects), a second group under NCCL."""
    return dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else None


def load_shard(
    path: str, *, dtype: str | torch.dtype | None = None, device: str | torch.device = "cpu", tokenizer: bool = False
) -> TriModeModel | VisionLanguageModel:
    """Load this process's shard of a checkpoint (after :func:`init_rank`): only its own slices.

    A VLM's decoder is sharded; its vision encoder and projector (small next to the decoder) are
    loaded whole, and only rank 0 runs them: image embeddings reach the other ranks in the batch.
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    config, vision = read_config(path)
    check_shardable(config, world)

    def build(text_config: ModelConfig) -> TriModeModel:
        return build_sharded(text_config, rank, world)

    if vision is not None:
        select = slice_selector(config, rank, world, prefix="language_model.")
        return load_vlm(
            path, dtype=dtype, device=device, tokenizer=tokenizer, select=select, build_text=build, warm_up=False
        )
    select = slice_selector(config, rank, world)
    return load_model(path, dtype=dtype, device=device, select=select, build=build, tokenizer=tokenizer, warm_up=False)


def decoder(shard: TriModeModel | VisionLanguageModel) -> TriModeModel:
    """The part of a shard that the engine runs (a VLM's ``language_model``)."""
    return shard.language_model if isinstance(shard, VisionLanguageModel) else shard


class TensorParallelModel:
    """Rank 0 of a tensor-parallel group, usable wherever a ``TriModeModel`` is.

    ``new_cache`` and ``__call__`` first broadcast a command so that every rank allocates its KV
    shard / runs the same forward; everything else (config, tokenizer, dtype, ...) is rank 0's
    shard's own attribute. Caches are referenced by id on the other ranks and dropped there when
    rank 0's cache is garbage-collected (the drop rides on the next command, never from the
    collector's thread).
    """

    def __init__(self, shard: TriModeModel, control: dist.ProcessGroup | None = None) -> None:
        self.shard = shard
        self.control = control
        self.world = dist.get_world_size()
        self._ids = itertools.count()
        self._cache_ids: weakref.WeakKeyDictionary[PagedKVCache, int] = weakref.WeakKeyDictionary()
        self._dropped: deque[int] = deque()  # appended by finalizers (any thread), drained by _send
        self._lock = threading.Lock()  # one command (and its forward) at a time
        self.closed = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.shard, name)

    def _send(self, command: tuple) -> None:
        dropped = [self._dropped.popleft() for _ in range(len(self._dropped))]
        dist.broadcast_object_list([(dropped, command)], src=0, group=self.control)

    def new_cache(self, num_pages: int, page_size: int = 16) -> PagedKVCache:
        cache = self.shard.new_cache(num_pages, page_size)
        with self._lock:
            cache_id = next(self._ids)
            self._send(("new_cache", cache_id, num_pages, page_size))
        self._cache_ids[cache] = cache_id
        weakref.finalize(cache, self._dropped.append, cache_id)
        return cache

    def __call__(self, batch: StepBatch, cache: PagedKVCache) -> torch.Tensor:
        with self._lock:
            self._send(("forward", self._cache_ids[cache], batch))
            return self.shard(batch, cache)

    def deferred_logits(self, index: torch.Tensor) -> torch.Tensor:
        with self._lock:
            self._send(("deferred_logits", index.cpu()))
            return self.shard.deferred_logits(index)

    def close(self) -> None:
        """Release the other ranks from :func:`follow` (the process group stays up for its owner)."""
        with self._lock:
            if not self.closed:
                self.closed = True
                self._send(("stop",))


def follow(shard: TriModeModel, control: dist.ProcessGroup | None = None) -> int:
    """What ranks other than 0 run: execute rank 0's commands until it stops the group.

    Returns how many KV caches were still allocated at the stop (0 once rank 0 dropped them all).
    """
    caches: dict[int, PagedKVCache] = {}
    while True:
        message: list[Any] = [None]
        dist.broadcast_object_list(message, src=0, group=control)
        dropped, command = message[0]
        for cache_id in dropped:
            caches.pop(cache_id, None)
        op = command[0]
        if op == "stop":
            return len(caches)
        if op == "new_cache":
            _, cache_id, num_pages, page_size = command
            caches[cache_id] = shard.new_cache(num_pages, page_size)
        elif op == "forward":
            _, cache_id, batch = command
            shard(batch, caches[cache_id])
        elif op == "deferred_logits":
            shard.deferred_logits(command[1].to(shard.device))
        else:
            raise ValueError(f"unknown tensor-parallel command {op!r}")
