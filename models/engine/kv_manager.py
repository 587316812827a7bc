"""KV memory like vLLM v1: pages allocated on demand, a block table on the device, prefix caching.

A sequence holds the pages covering the positions it has written or is about to write; a step
asks for pages only for what it writes (speculative overshoot included), so the pool holds
what requests use now, not their worst case. Rollback after a rejected draft is a length change:
the pages stay with the sequence for its next verify.

Prefix caching: a page full of committed tokens gets a digest of its tokens chained with the
digest of the page before it (plus whatever else its keys/values depend on, such as image
embeddings), so equal digests mean equal keys/values (given the shape-invariant forward). A new
sequence whose leading pages have known digests shares those pages instead of recomputing them.
Pages nobody holds any more keep their digest and sit in an LRU queue; they are evicted (their
digest forgotten) only when a free page is needed and no page without a digest is left.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Iterable, Sequence

import torch


class CacheFullError(RuntimeError):
    """The pool has no free page for a reservation."""


def chain_digests(parent: bytes, pages: Iterable[tuple[Sequence[int], bytes]]) -> list[bytes]:
    """Digests of consecutive full pages, each from the previous one's digest (``parent`` for the
    first), the page's token ids and ``extra`` bytes (what else its keys/values depend on)."""
    out = []
    for tokens, extra in pages:
        h = hashlib.sha256(parent)
        h.update(array("q", tokens).tobytes())
        h.update(extra)
        parent = h.digest()
        out.append(parent)
    return out


class KVCacheManager:
    """Page tables of the sequences sharing one ``PagedKVCache``, and its prefix cache."""

    def __init__(
        self,
        num_pages: int,
        page_size: int,
        *,
        max_seqs: int = 64,
        max_pages_per_seq: int | None = None,
        device: torch.device | str = "cpu",
        prefix_caching: bool = True,
    ) -> None:
        if num_pages <= 0 or page_size <= 0:
            raise ValueError("num_pages and page_size must be positive")
        self.num_pages = num_pages
        self.page_size = page_size
        self.prefix_caching = prefix_caching
        self._ref = [0] * num_pages
        self._digest: list[bytes | None] = [None] * num_pages
        self._cached: dict[bytes, int] = {}  # digest -> page holding it
        self._free: OrderedDict[int, None] = OrderedDict((p, None) for p in range(num_pages))  # LRU first
        self._tables: dict[int, list[int]] = {}
        self._lengths: dict[int, int] = {}
        self._digested: dict[int, int] = {}  # leading pages of a sequence whose digest is known
        self._rows: dict[int, int] = {}
        self._free_rows = list(range(max_seqs - 1, -1, -1))
        width = num_pages if max_pages_per_seq is None else max_pages_per_seq
        self._table = torch.zeros((max_seqs, width), dtype=torch.long, device=device)
        self._updates: list[tuple[int, int, int]] = []  # (row, column, page) not yet on the device

    # ----- sequences ---------------------------------------------------------------------------
    def add(self, seq_id: int) -> None:
        if seq_id in self._tables:
            raise KeyError(f"sequence {seq_id} already in the cache")
        if not self._free_rows:
            raise RuntimeError(f"block table full: {self._table.shape[0]} sequences at most")
        self._tables[seq_id] = []
        self._lengths[seq_id] = 0
        self._digested[seq_id] = 0
        self._rows[seq_id] = self._free_rows.pop()

    def __contains__(self, seq_id: int) -> bool:
        return seq_id in self._tables

    def free(self, seq_id: int) -> None:
        """Drop a sequence. Its pages that no other sequence holds become free: those with a digest
        at the LRU end (the last page first in line for eviction), the others first in line."""
        table = self._tables.pop(seq_id, None)
        if table is None:
            return
        del self._lengths[seq_id], self._digested[seq_id]
        self._free_rows.append(self._rows.pop(seq_id))
        for page in reversed(table):
            self._ref[page] -= 1
            if self._ref[page] == 0:
                self._free[page] = None
                if self._digest[page] is None:
                    self._free.move_to_end(page, last=False)

    def length(self, seq_id: int) -> int:
        return self._lengths[seq_id]

    def row(self, seq_id: int) -> int:
        """The sequence's row in ``block_table``."""
        return self._rows[seq_id]

    def page_table(self, seq_id: int) -> list[int]:
        return list(self._tables[seq_id])

    # ----- pages --------------------------------------------------------------------------------
    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    @property
    def free_pages(self) -> int:
        """Pages no sequence holds (cached prefixes among them: they are evicted on demand)."""
        return len(self._free)

    @property
    def used_pages(self) -> int:
        return self.num_pages - len(self._free)

    @property
    def capacity_tokens(self) -> int:
        return self.num_pages * self.page_size

    def missing_pages(self, seq_id: int, num_tokens: int) -> int:
        """Pages a sequence must still get to hold positions ``0 .. num_tokens - 1``."""
        return max(self.pages_for(num_tokens) - len(self._tables[seq_id]), 0)

    def reserve(self, seq_id: int, num_tokens: int) -> None:
        """Make room for positions ``0 .. num_tokens - 1`` of a sequence (all or nothing)."""
        missing = self.missing_pages(seq_id, num_tokens)
        if missing > len(self._free):
            raise CacheFullError(f"KV pool exhausted: need {missing} pages, {len(self._free)} free")
        for _ in range(missing):
            page, _ = self._free.popitem(last=False)
            digest = self._digest[page]
            if digest is not None:  # evict the cached prefix page
                if self._cached.get(digest) == page:
                    del self._cached[digest]
                self._digest[page] = None
            self._append(seq_id, page)

    def _append(self, seq_id: int, page: int) -> None:
        table = self._tables[seq_id]
        if len(table) >= self._table.shape[1]:
            raise IndexError(f"sequence {seq_id} needs more than {self._table.shape[1]} pages")
        self._ref[page] += 1
        self._updates.append((self._rows[seq_id], len(table), page))
        table.append(page)

    def set_length(self, seq_id: int, length: int) -> None:
        """Commit (or roll back) a sequence to ``length`` tokens; its pages stay with it."""
        if length > len(self._tables[seq_id]) * self.page_size:
            raise ValueError(f"length {length} exceeds reserved pages of sequence {seq_id}")
        self._lengths[seq_id] = length

    # ----- prefix cache ---------------------------------------------------------------------------
    def match_prefix(self, seq_id: int, digests: Sequence[bytes]) -> int:
        """Share the longest run of cached pages with these leading digests with a sequence that holds
        no page yet; returns how many pages it got (0 with prefix caching off)."""
        if self._tables[seq_id]:
            raise ValueError(f"sequence {seq_id} already holds pages")
        if not self.prefix_caching:
            return 0
        for digest in digests:
            page = self._cached.get(digest)
            if page is None:
                break
            if self._ref[page] == 0:
                del self._free[page]
            self._append(seq_id, page)
        hits = len(self._tables[seq_id])
        self._digested[seq_id] = hits
        return hits

    def cache_pages(self, seq_id: int, digests: Sequence[bytes]) -> None:
        """Record the digests of a sequence's leading pages (full of committed tokens) so that later
        sequences can share them. A digest another page already holds stays with that page."""
        if not self.prefix_caching:
            return
        table = self._tables[seq_id]
        for index in range(self._digested[seq_id], len(digests)):
            page, digest = table[index], digests[index]
            if digest not in self._cached and self._digest[page] is None:
                self._cached[digest] = page
                self._digest[page] = digest
        self._digested[seq_id] = max(self._digested[seq_id], len(digests))

    # ----- slot mapping ---------------------------------------------------------------------------
    @property
    def block_table(self) -> torch.Tensor:
        """[max_seqs, max_pages_per_seq] page ids on the device, rows by ``row(seq_id)``; pages given
        out since the last read are written in one indexed copy (the table is never rebuilt)."""
        if self._updates:
            rows, cols, pages = zip(*self._updates)
            self._updates.clear()
            index = torch.tensor([rows, cols], dtype=torch.long)
            values = torch.tensor(pages, dtype=torch.long)
            self._table.index_put_(tuple(index.to(self._table.device)), values.to(self._table.device))
        return self._table

    def slots(self, seq_id: int, positions: torch.Tensor | list[int]) -> torch.Tensor:
        """Flat slot indices of positions of a sequence (positions must be reserved)."""
        pos = torch.as_tensor(positions, dtype=torch.long)
        table = torch.tensor(self._tables[seq_id], dtype=torch.long)
        page = pos // self.page_size
        if len(pos) and int(page.max()) >= len(table):
            raise IndexError(f"position {int(pos.max())} of sequence {seq_id} is not reserved")
        return (table[page] * self.page_size + pos % self.page_size).to(self._table.device)
