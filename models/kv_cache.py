"""Paged KV cache: a bounded pool of fixed-size pages and a page table per sequence.

Rollback is a length change (pages past the new length go back to the pool), so speculative
verification can write a whole block and keep only the accepted prefix.
"""

from __future__ import annotations

import torch


class CacheFullError(RuntimeError):
    """The pool has no free page for a reservation."""


class PagedKVCache:
    """Keys/values of all layers in ``[layers, pages * page_size, kv_heads, head_dim]`` slot arrays.

    A sequence's token at position ``p`` lives in slot ``table[p // page_size] * page_size + p % page_size``.
    """

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
        self._free: list[int] = list(range(num_pages - 1, -1, -1))
        self._tables: dict[int, list[int]] = {}
        self._lengths: dict[int, int] = {}

    # ----- bookkeeping -------------------------------------------------------------------------
    def add(self, seq_id: int) -> None:
        if seq_id in self._tables:
            raise KeyError(f"sequence {seq_id} already in the cache")
        self._tables[seq_id] = []
        self._lengths[seq_id] = 0

    def __contains__(self, seq_id: int) -> bool:
        return seq_id in self._tables

    def length(self, seq_id: int) -> int:
        return self._lengths[seq_id]

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    @property
    def free_pages(self) -> int:
        return len(self._free)

    @property
    def used_pages(self) -> int:
        return self.num_pages - len(self._free)

    @property
    def capacity_tokens(self) -> int:
        return self.num_pages * self.page_size

    def reserve(self, seq_id: int, num_tokens: int) -> None:
        """Make room for positions ``0 .. num_tokens - 1`` of a sequence (all or nothing)."""
        table = self._tables[seq_id]
        missing = self.pages_for(num_tokens) - len(table)
        if missing > len(self._free):
            raise CacheFullError(f"KV pool exhausted: need {missing} pages, {len(self._free)} free")
        for _ in range(max(missing, 0)):
            table.append(self._free.pop())

    def set_length(self, seq_id: int, length: int) -> None:
        """Commit (or roll back) a sequence to ``length`` tokens; pages past it return to the pool."""
        table = self._tables[seq_id]
        if length > len(table) * self.page_size:
            raise ValueError(f"length {length} exceeds reserved pages of sequence {seq_id}")
        keep = self.pages_for(length)
        while len(table) > keep:
            self._free.append(table.pop())
        self._lengths[seq_id] = length

    def free(self, seq_id: int) -> None:
        """Drop a sequence and return all of its pages at once."""
        table = self._tables.pop(seq_id, None)
        self._lengths.pop(seq_id, None)
        if table:
            self._free.extend(reversed(table))

    # ----- slot mapping ------------------------------------------------------------------------
    def slots(self, seq_id: int, positions: torch.Tensor | list[int]) -> torch.Tensor:
        """Flat slot indices of positions of a sequence (positions must be reserved)."""
        pos = torch.as_tensor(positions, dtype=torch.long)
        table = torch.tensor(self._tables[seq_id], dtype=torch.long)
        page = pos // self.page_size
        if len(pos) and int(page.max()) >= len(table):
            raise IndexError(f"position {int(pos.max())} of sequence {seq_id} is not reserved")
        return (table[page] * self.page_size + pos % self.page_size).to(self.k.device)

    def page_table(self, seq_id: int) -> list[int]:
        return list(self._tables[seq_id])
