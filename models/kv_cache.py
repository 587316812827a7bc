"""The paged KV cache's storage: a bounded pool of fixed-size pages of keys and values for every layer.

Which pages belong to which sequence, on-demand allocation, rollback and prefix sharing are the KV
manager's business (``models.engine.kv_manager``); the forward pass only ever sees flat slot
indices (``page * page_size + offset``) computed from its block table.
"""

from __future__ import annotations

import torch


class PagedKVCache:
    """Keys/values of all layers in ``[layers, pages * page_size, kv_heads, head_dim]`` slot arrays."""

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        num_pages: int,
        page_size: int = 16,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        if num_pages <= 0 or page_size <= 0:
            raise ValueError("num_pages and page_size must be positive")
        self.page_size = page_size
        self.num_pages = num_pages
        shape = (num_layers, num_pages * page_size, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        # each layer's (keys, values) slot arrays as views, made once: indexing ``k[layer]`` in every
        # forward costs two operations a layer and call
        self.layers = list(zip(self.k.unbind(0), self.v.unbind(0)))

    @property
    def device(self) -> torch.device:
        return self.k.device

    @property
    def capacity_tokens(self) -> int:
        return self.num_pages * self.page_size
